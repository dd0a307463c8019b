"""The one stop-signal handler of the training loops (GRPO and SFT): Slurm preemption checkpoints and exits."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

from nemo_logitavg.parallel import wait_group


class StopRequested:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to checkpoint at the end of the step and exit.

    The signals are blocked in this thread, not only handled: helper processes started later (reward workers,
    checkpoint writers) inherit the blocked mask, so Slurm signalling every process of the step cannot kill
    them mid-save. Pending signals are collected at the end of each step; threads that do not block them reach
    the handler instead. Create it before anything starts threads or processes (``run_grpo`` and ``run_sft`` do
    so first thing). ``prefix`` names the loop in its console line (``[grpo]``, ``[sft]``). ``requested``: this
    process was signalled; ``stopped``: ``agreed()`` said stop (the same on every rank).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, prefix: str = "grpo") -> None:
        self.requested = False
        self.stopped = False
        self.prefix = prefix
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        print(f"[{self.prefix}] received {signal.Signals(signum).name}: checkpointing after this step", flush=True)
        self.requested = True

    def poll(self) -> bool:
        """True once this process was signalled (consumes the pending signals of this thread)."""
        for sig in set(self.SIGNALS) & signal.sigpending():
            signal.sigtimedwait([sig], 0)  # consume it
            self._handle(sig, None)
        return self.requested

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (a collective).

        A CPU flag over ``wait_group()`` (gloo): the other ranks reach it while rank 0 still evaluates.
        """
        flag = torch.tensor([1.0 if self.poll() else 0.0], device="cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=wait_group())
        self.stopped = self.stopped or bool(flag.item())
        return bool(flag.item())
