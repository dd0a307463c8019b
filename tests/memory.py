"""Peak resident memory of a block of code, from the kernel's high-water mark (Linux), reset when it starts."""

from __future__ import annotations

import gc


def _kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakRSS:
    """``with PeakRSS() as rss: ...``; then ``rss.growth``: bytes the resident set grew to at its peak above its
    size when the block started (VmHWM reset through ``/proc/self/clear_refs``: no sampling, no earlier peaks)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.before = _kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _kib("VmHWM") * 1024

    @property
    def growth(self) -> int:
        return self.peak - self.before
