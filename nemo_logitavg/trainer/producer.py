"""Asynchronous GRPO's rollout side: the producer thread that samples ahead, and the staleness check.

With ``algorithm.max_staleness = k >= 1``, rank 0 runs a ``RolloutProducer`` that samples and grades the steps
after the one training, at most ``k`` steps ahead of the last pushed policy; ``stale_prompts`` names the prompts
whose completions are too old to train on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from nemo_logitavg.trainer.interfaces import CompletionProtocol


def stale_prompts(groups: Sequence[Sequence[CompletionProtocol]], step: int, max_staleness: int) -> list[int]:
    """Indices of the prompts with a completion too old to train on at ``step``: ``policy_step < step - k``.

    Raises:
        RuntimeError: a completion reports a policy step above ``step`` (weights the trainer never pushed).
    """
    future = [c.policy_step for group in groups for c in group if c.policy_step > step]
    if future:
        raise RuntimeError(f"a rollout server reports policy step {max(future)} while the trainer is at step {step}")
    return [i for i, group in enumerate(groups) if any(c.policy_step < step - max_staleness for c in group)]


class RolloutProducer:
    """Rank 0 of asynchronous GRPO: a thread that samples (and grades) step after step, ahead of the trainer.

    ``sample(s)`` makes step ``s``'s payload (HTTP and grading only: no collective runs in this thread). Step ``s``
    starts only once ``s <= pushed + max_staleness`` (``allow(pushed)`` after each push), so it is sampled by
    weights at most ``max_staleness`` steps older than the step that trains on it; ``take(s)`` hands it over.
    Steps from ``end`` on are never sampled (the run stops before them).
    ``weights_wait_s`` adds up the time the producer (so the servers) waited for a push to be allowed on.
    """

    def __init__(self, sample: Callable[[int], dict], first_step: int, max_staleness: int, end: int) -> None:
        self._sample, self._k, self._end = sample, max_staleness, end
        self._cond = threading.Condition()
        self._ready: dict[int, dict] = {}
        self._next, self._allowed = first_step, first_step + max_staleness
        self._error: BaseException | None = None
        self._closed = False
        self.weights_wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def allow(self, pushed_step: int) -> None:
        """The servers now serve ``pushed_step``: steps up to ``pushed_step + max_staleness`` may be sampled."""
        with self._cond:
            self._allowed = pushed_step + self._k
            self._cond.notify_all()

    def take(self, step: int) -> tuple[dict, float]:
        """Step ``step``'s payload and the seconds the caller waited for it; re-raises the producer's error."""
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise RuntimeError(f"the rollout producer failed before step {step}") from self._error
            return self._ready.pop(step), time.monotonic() - start

    def take_weights_wait(self) -> float:
        """The seconds the producer waited for pushes since the last call (and reset the count)."""
        with self._cond:
            waited, self.weights_wait_s = self.weights_wait_s, 0.0
        return waited

    def close(self) -> int:
        """Stop after the request in progress; returns how many sampled steps are discarded (never trained)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        return len(self._ready)

    def _run(self) -> None:
        while True:
            with self._cond:
                start = time.monotonic()
                self._cond.wait_for(lambda: self._closed or self._next <= self._allowed)
                self.weights_wait_s += time.monotonic() - start
                if self._closed or self._next >= self._end:
                    return
                step, self._next = self._next, self._next + 1
            try:
                payload = self._sample(step)
            except BaseException as exc:  # handed to the trainer's take(): a dead producer must not hang it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[step] = payload
                self._cond.notify_all()
