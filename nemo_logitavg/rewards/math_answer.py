r"""Verifiable math reward: the last ``\boxed{}`` answer of a completion graded against a bare-LaTeX gold answer.

Grading uses math-verify (``parse`` both sides, then ``verify(gold, prediction)`` in that order). math-verify can
hang on hostile answers (``9^{9^{9^{9}}}`` evaluates a tower of powers inside C code that no signal interrupts), and
its own time limit relies on ``signal.alarm``, which works only in a main thread. So every answer is graded in a
small pool of worker processes, with two limits per answer:

- a soft limit (80% of ``timeout``) inside the worker, a ``setitimer`` alarm that raises out of pure-Python work and
  keeps the worker alive;
- a hard limit (``timeout``) enforced by the parent: a worker still busy at its deadline is killed and replaced,
  and the batch goes on with the other workers meanwhile.

Either way the answer scores 0 and is counted in ``GradeStats.num_timeouts``. The pool is persistent (started on
first use, reused across calls); ``score_math`` uses a module-level default pool that closes at interpreter exit.

Cheap guards in the parent score 0 without sending anything to a worker (``GradeStats.num_rejected``):

- a last box that is never closed (a completion cut mid-answer);
- a boxed answer longer than ``MAX_ANSWER_CHARS`` characters, or one whose brackets nest deeper than
  ``MAX_NESTING_DEPTH`` (math-verify's ANTLR parser slows down exponentially with nesting: ten nested groups take
  over a second, fourteen tens of seconds; the 5000 MATH test gold answers nest at most 3 deep and are at most
  81 characters long);
- an empty answer, or an empty, oversized or over-deep gold answer.

Without any box, the last ``MAX_FALLBACK_CHARS`` characters of the completion go to math-verify's own extraction
("final answer is $x$", the last LaTeX expression, a plain number), under the same caps: an empty tail, or one whose
brackets nest deeper than ``MAX_NESTING_DEPTH``, scores 0 unparsed (an unboxed answer nested 14-30 deep otherwise
spends the whole time limit in the parser).

Each worker is a fresh interpreter (``subprocess``: fork and exec, safe in a trainer process that already runs
threads, torch and gloo) that imports only this module and math-verify. Unlike multiprocessing's ``spawn`` and
``forkserver`` start methods it never re-imports the caller's ``__main__``, so a script that calls ``score_math``
at top level needs no ``if __name__ == "__main__":`` guard (and a worker does not re-run the trainer's imports). A
worker costs about a second to start, paid once per worker and again after a kill. Workers inherit the parent's
signal mask, environment and import path.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 2000
"""A boxed answer (or a gold answer) longer than this scores 0 without being parsed."""

MAX_NESTING_DEPTH = 8
"""A boxed answer whose ``{ ( [`` brackets nest deeper than this scores 0 without being parsed."""

MAX_FALLBACK_CHARS = 4000
"""Without a box, only this many trailing characters of the completion go to math-verify's extraction."""

GRADE_TIMEOUT = 5.0
"""Seconds one answer may take to grade (``MathGrader``'s and ``score_math``'s default; the configs' default)."""

STARTUP_TIMEOUT = 120.0
"""Seconds a grader worker may take to start (import math-verify) before the pool gives up."""

SOFT_TIMEOUT_FRACTION = 0.8
"""The in-worker alarm fires at this fraction of the per-answer time limit; the parent kills at the full limit."""

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An escaped brace (\{ \}) or an escaped backslash (\\) is one token and never opens or closes a group.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")
_BRACKET_TOKEN = re.compile(r"\\[\\{}]|[{}()\[\]]")


# --------------------------------------------------------------------------------------------------------------
# Extraction (parent side, no math-verify import)
# --------------------------------------------------------------------------------------------------------------


def find_last_boxed(text: str, max_chars: int | None = None) -> tuple[str, str | None]:
    r"""Locate the last ``\boxed{...}`` / ``\fbox{...}`` of ``text`` with balanced-brace matching.

    "Last" is the box that starts last (a box nested inside another one wins over its parent, as in the MATH
    reference code). Whitespace may separate the command from its brace (``\boxed {x}``); ``\boxed`` without a
    brace is skipped. Returns ``(status, content)`` with status ``"ok"`` (content is the raw text between the
    braces), ``"none"`` (no box), ``"unclosed"`` (the last box never closes) or ``"too_long"`` (its content runs
    past ``max_chars``; scanning stops there, so a 1 MB string costs microseconds).
    """
    # One cursor per command, each moved back only past its own braceless occurrences: searching both from the
    # same end again would rescan the text once per braceless "\\boxed", quadratic in its length.
    boxed_at, fbox_at = text.rfind("\\boxed"), text.rfind("\\fbox")
    while True:
        start = max(boxed_at, fbox_at)
        if start < 0:
            return "none", None
        match = _BOX_START.match(text, start)
        if match is None:
            if start == boxed_at:
                boxed_at = text.rfind("\\boxed", 0, start)
            else:
                fbox_at = text.rfind("\\fbox", 0, start)
            continue
        body = match.end()
        limit = len(text) if max_chars is None else min(len(text), body + max_chars + 1)
        depth = 1
        for token in _BRACE_TOKEN.finditer(text, body, limit):
            if token.group() == "{":
                depth += 1
            elif token.group() == "}":
                depth -= 1
                if depth == 0:
                    return "ok", text[body : token.start()]
        return ("too_long" if limit < len(text) else "unclosed"), None


def extract_last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, stripped; None if there is no closed box.

    >>> extract_last_boxed(r"so $x = \boxed{\frac{1}{2}}$ and finally \boxed {\{1, 2\}}.")
    '\\{1, 2\\}'
    """
    status, content = find_last_boxed(text)
    return content.strip() if status == "ok" else None


def nesting_depth(latex: str) -> int:
    """Deepest nesting of ``{ ( [`` groups in ``latex`` (escaped braces do not count; stray closers are ignored)."""
    depth = deepest = 0
    for token in _BRACKET_TOKEN.finditer(latex):
        char = token.group()
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(depth - 1, 0)
    return deepest


def prepare_prediction(completion: str) -> tuple[str | None, str]:
    """The text a worker parses for ``completion``, or None when it scores 0 without parsing; and why.

    The reason is ``"boxed"`` or ``"fallback"`` when there is text to parse, else ``"unclosed"``, ``"too_long"``,
    ``"empty"`` or ``"too_deep"``.
    """
    status, content = find_last_boxed(completion, MAX_ANSWER_CHARS)
    if status == "none":  # math-verify extracts from the tail: the same caps apply to it as to a boxed answer
        content, kind = completion[-MAX_FALLBACK_CHARS:].strip(), "fallback"
    elif status != "ok":
        return None, status
    else:
        content, kind = content.strip(), "boxed"
    if not content:
        return None, "empty"
    if nesting_depth(content) > MAX_NESTING_DEPTH:
        return None, "too_deep"
    return ("\\boxed{" + content + "}" if kind == "boxed" else content), kind


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs in the pool processes
# --------------------------------------------------------------------------------------------------------------


class _SoftTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException so that library ``except Exception`` blocks do not eat it."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout()


_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_SIZE = 4096


def verify_answer(prediction: str, gold: str) -> float:
    r"""1.0 if math-verify judges ``prediction`` (text to extract from) equal to ``gold`` (bare LaTeX), else 0.0.

    Runs without math-verify's own alarms (``parsing_timeout=None``, ``timeout_seconds=None``): the worker's soft
    limit covers parsing and comparison together. Parsed gold answers are cached (a GRPO group shares one gold).
    """
    from math_verify import parse, verify  # heavy (SymPy, ANTLR): loaded where answers are graded, not on import

    gold_parsed = _GOLD_CACHE.get(gold)
    if gold_parsed is None:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = gold_parsed
    if not gold_parsed:
        return 0.0
    predicted = parse(prediction, parsing_timeout=None)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold_parsed, predicted, timeout_seconds=None) else 0.0


def latex_parses(content: str) -> float:
    r"""1.0 if math-verify's LaTeX extraction turns ``\boxed{content}`` into a SymPy object, else 0.0."""
    from math_verify import LatexExtractionConfig, parse  # heavy (SymPy, ANTLR): loaded only when used

    parsed = parse(
        "\\boxed{" + content + "}",
        extraction_config=[LatexExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )
    return 1.0 if parsed else 0.0


# What a worker interpreter runs: the parent's import path first (as multiprocessing's spawn does, so a custom
# ``grade_fn`` imports from where the parent's does), then the worker loop. Nothing imports ``__main__``.
_WORKER_BOOT = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from nemo_logitavg.rewards.math_answer import _worker_main\n"
    "_worker_main(conn)\n"
)


def _worker_main(conn) -> None:
    """Worker loop: receive the grading function, then ``(task_id, kind, args, soft_timeout)`` tasks, answering
    ``(task_id, value, status)``; a start-up failure is reported as ``("failed", message)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent cleans up.
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts are counted by the pool instead
    stage = "loading grade_fn (define it at module level in an importable module, not in __main__)"
    try:
        grade_fn = conn.recv()  # unpickling a custom grade_fn imports its module
        handlers = {"grade": grade_fn or verify_answer, "latex": latex_parses}
        stage = "importing math-verify (is it installed?)"
        verify_answer("$1$", "1")  # import math-verify, SymPy and the ANTLR parser before reporting ready
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{stage}: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, kind, args, soft_timeout = message
        value, status = 0.0, "ok"
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout)
            try:
                value = float(handlers[kind](*args))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            status = "timeout"
        except Exception:  # noqa: BLE001 - a grading error scores 0 like any unparseable answer
            logger.debug("grading task failed", exc_info=True)
            status = "error"
        try:
            conn.send((task_id, value, status))
        except (BrokenPipeError, OSError):
            return


# --------------------------------------------------------------------------------------------------------------
# Parent side: the pool
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GradeStats:
    """Counts for one call (``MathGrader.last_stats``) or all calls (``MathGrader.stats``)."""

    num_answers: int = 0
    """Answers in the call(s)."""
    num_graded: int = 0
    """Sent to a worker."""
    num_rejected: int = 0
    """Scored 0 in the parent without parsing (see the module docstring)."""
    num_timeouts: int = 0
    """Over the per-answer time limit: stopped by the worker's alarm or killed by the parent."""
    num_killed: int = 0
    """Of the timeouts, those whose worker the parent killed and replaced."""
    num_errors: int = 0
    """The grader raised, or its worker died on its own (then it is replaced)."""
    elapsed_s: float = 0.0

    def add(self, other: GradeStats) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class _Worker:
    def __init__(self, grade_fn):
        self.conn, child_conn = multiprocessing.Pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(child_conn.fileno())],
                pass_fds=(child_conn.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_conn.close()
        try:
            self.conn.send(list(sys.path))
            self.conn.send(grade_fn)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the interpreter died at once: the scheduler sees the closed pipe and reports its exit
        self.started_at = time.monotonic()
        self.ready = False
        self.task: tuple[int, int] | None = None  # (task id, index in the batch)
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self.conn.close()


def _shutdown(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return
    for worker in workers:
        if worker.task is not None:
            worker.kill()
        else:
            worker.stop()
    workers.clear()


class MathGrader:
    r"""A persistent pool of math-verify worker processes with a hard per-answer time limit.

    >>> with MathGrader(num_workers=2, timeout=5.0) as grader:  # doctest: +SKIP
    ...     scores, stats = grader.score([r"... so \boxed{\frac12}"], [r"0.5"])
    ...     scores, stats.num_timeouts
    ([1.0], 0)

    ``grade_fn(prediction_text, gold) -> float`` replaces math-verify (it must be picklable: defined at module
    level in a module the workers can import, not in ``__main__``, which they never import). Not meant to be
    shared across processes: a forked child that uses an inherited grader starts its own workers.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout: float = GRADE_TIMEOUT,
        *,
        grade_fn: Callable[[str, str], float] | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ):
        self.num_workers = num_workers or min(2, os.cpu_count() or 1)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self._grade_fn = grade_fn
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._task_ids = itertools.count()
        self.stats = GradeStats()
        self.last_stats = GradeStats()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._owner_pid)

    # -- public API -------------------------------------------------------------------------------------------

    def score(
        self, completions: Sequence[str], gold_answers: Sequence[str], timeout: float | None = None
    ) -> tuple[list[float], GradeStats]:
        r"""Score each completion's last boxed answer against its bare-LaTeX gold answer: 1.0 or 0.0."""
        if len(completions) != len(gold_answers):
            raise ValueError(f"{len(completions)} completions but {len(gold_answers)} gold answers")
        scores = [0.0] * len(completions)
        tasks: list[tuple[int, tuple]] = []
        rejected = 0
        for index, (completion, gold) in enumerate(zip(completions, gold_answers, strict=True)):
            if not isinstance(completion, str) or not isinstance(gold, str):
                raise TypeError(f"completion and gold answer must be str (index {index})")
            gold = gold.strip()
            prediction, _ = prepare_prediction(completion)
            if (
                prediction is None
                or not gold
                or len(gold) > MAX_ANSWER_CHARS
                or nesting_depth(gold) > MAX_NESTING_DEPTH
            ):
                rejected += 1
                continue
            tasks.append((index, (prediction, gold)))
        stats = self._run("grade", tasks, scores, timeout)
        stats.num_rejected = rejected
        return scores, self._record(stats, len(completions))

    def check_latex(self, contents: Sequence[str], timeout: float | None = None) -> tuple[list[bool], GradeStats]:
        r"""Whether math-verify parses each ``\boxed{content}`` into a SymPy object (False on timeout)."""
        values = [0.0] * len(contents)
        stats = self._run("latex", [(i, (c,)) for i, c in enumerate(contents)], values, timeout)
        return [v > 0 for v in values], self._record(stats, len(contents))

    def close(self) -> None:
        """Stop the workers (a later call starts new ones)."""
        with self._lock:
            _shutdown(self._workers, self._owner_pid)

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the scheduler ----------------------------------------------------------------------------------------

    def _record(self, stats: GradeStats, num_answers: int) -> GradeStats:
        stats.num_answers = num_answers
        self.last_stats = stats
        self.stats.add(stats)
        return stats

    def _spawn(self) -> _Worker:
        return _Worker(self._grade_fn)

    def _run(self, kind: str, tasks: list[tuple[int, tuple]], out: list[float], timeout: float | None) -> GradeStats:
        """Grade ``tasks`` (batch index, args) into ``out``; failures leave the 0 already there."""
        limit = self.timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        stats = GradeStats(num_graded=len(tasks))
        begin = time.monotonic()
        if not tasks:
            return stats
        with self._lock:
            if os.getpid() != self._owner_pid:  # forked: the inherited workers belong to the parent
                self._workers = []
                self._owner_pid = os.getpid()
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._owner_pid)
            while len(self._workers) < self.num_workers:
                self._workers.append(self._spawn())
            try:
                self._schedule(kind, deque(tasks), out, limit, stats)
            except BaseException:
                _shutdown(self._workers, self._owner_pid)  # no worker is left busy with a stale task; restart later
                raise
        stats.elapsed_s = time.monotonic() - begin
        return stats

    def _schedule(self, kind: str, pending: deque, out: list[float], limit: float, stats: GradeStats) -> None:
        """Hand ``pending`` tasks to idle workers and collect their answers until none is pending or in flight."""
        soft = max(limit * SOFT_TIMEOUT_FRACTION, 1e-3)
        busy = 0
        while pending or busy:
            now = time.monotonic()
            busy += self._dispatch(kind, pending, soft, now + limit)
            ready = multiprocessing.connection.wait([w.conn for w in self._workers], timeout=self._wait_s(now))
            busy -= self._collect(ready, out, stats)
            busy -= self._expire(out, stats)

    def _dispatch(self, kind: str, pending: deque, soft: float, deadline: float) -> int:
        """Send the next pending tasks to the ready idle workers (due by ``deadline``); how many were sent."""
        sent = 0
        for slot, worker in enumerate(self._workers):
            if worker.ready and worker.task is None and pending:
                index, args = pending[0]
                task_id = next(self._task_ids)
                try:
                    worker.conn.send((task_id, kind, args, soft))
                except (OSError, ValueError):  # died while idle: replace it, the task waits for another
                    worker.kill()
                    self._workers[slot] = self._spawn()
                    continue
                pending.popleft()
                worker.task = (task_id, index)
                worker.deadline = deadline
                sent += 1
        return sent

    def _wait_s(self, now: float) -> float | None:
        """Seconds until the next deadline (a task's, or a starting worker's); None when nothing has one."""
        wake = [w.deadline for w in self._workers if w.task is not None]
        wake += [w.started_at + self.startup_timeout for w in self._workers if not w.ready]
        return max(0.0, min(wake) - now) if wake else None

    def _collect(self, ready: list, out: list[float], stats: GradeStats) -> int:
        """Read the messages of the workers whose connection is ``ready``; how many tasks ended (answered, or lost
        with a worker that died). A worker that cannot start raises."""
        ended = 0
        for slot, worker in enumerate(self._workers):
            if worker.conn not in ready:
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):  # the worker died on its own
                if not worker.ready:
                    worker.kill()
                    raise RuntimeError(
                        f"a math grader worker exited during start-up (exit code {worker.process.returncode}); "
                        "its error output is above"
                    ) from None
                if worker.task is not None:
                    ended += 1
                    stats.num_errors += 1
                worker.kill()
                self._workers[slot] = self._spawn()
                continue
            ended += self._take_message(worker, message, out, stats)
        return ended

    def _take_message(self, worker: _Worker, message: tuple, out: list[float], stats: GradeStats) -> int:
        """One worker message: ready, failed to start (raises), or an answer (1: its task ended)."""
        if message[0] == "ready":
            worker.ready = True
            return 0
        if message[0] == "failed":
            worker.kill()
            raise RuntimeError(f"a math grader worker could not start: {message[1]}")
        task_id, value, status = message
        if worker.task is None or worker.task[0] != task_id:
            return 0  # a stale answer (cannot happen with one task in flight, kept as a guard)
        out[worker.task[1]] = value if status == "ok" else 0.0
        stats.num_timeouts += status == "timeout"
        stats.num_errors += status == "error"
        worker.task = None
        return 1

    def _expire(self, out: list[float], stats: GradeStats) -> int:
        """Kill (and replace) the workers past their task's deadline, scoring it 0; how many were killed. A worker
        that does not start in time raises."""
        killed = 0
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker.task is not None and now >= worker.deadline:
                out[worker.task[1]] = 0.0
                stats.num_timeouts += 1
                stats.num_killed += 1
                killed += 1
                worker.kill()
                self._workers[slot] = self._spawn()
            elif not worker.ready and now >= worker.started_at + self.startup_timeout:
                raise RuntimeError(f"a math grader worker did not start within {self.startup_timeout:.0f} s")
        return killed


# --------------------------------------------------------------------------------------------------------------
# The default pool and the named interface
# --------------------------------------------------------------------------------------------------------------

_DEFAULT: MathGrader | None = None
_DEFAULT_LOCK = threading.Lock()


def get_default_grader() -> MathGrader:
    """The process-wide pool used by ``score_math`` (``min(2, cpu_count)`` workers), created on first use."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathGrader()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def score_math(completions: Sequence[str], gold_answers: Sequence[str], timeout: float = GRADE_TIMEOUT) -> list[float]:
    r"""1.0 where a completion's answer equals its gold answer (bare LaTeX, no ``$`` or ``\boxed``), else 0.0.

    The answer is the last ``\boxed{}`` of the completion (math-verify's own extraction without a box); a wrong,
    unparseable or timed-out answer scores 0. ``timeout`` is the per-answer limit in seconds. Counts of the call
    (timeouts included) are in ``get_default_grader().last_stats``.
    """
    return get_default_grader().score(completions, gold_answers, timeout=timeout)[0]
