"""Progress output that reads well in a terminal and in a log file.

In a terminal (stderr is a TTY) a tqdm bar is drawn and cleared when the work ends, so the next
print starts on a clean line. In a log (stderr redirected or captured: CI, nohup, a notebook's
captured cell, a Trainer log) there is no bar and no carriage return: one line when the work
starts and one when it ends, each ending with a newline. LOLDU_PROGRESS overrides the choice:
"bar", "lines" or "off" ("auto", the default, picks by the TTY).
"""
import os
import sys
import time
from typing import Optional

from tqdm.auto import tqdm

MODES = ("auto", "bar", "lines", "off")


def mode() -> str:
    """The progress mode in effect: "bar", "lines" or "off"."""
    m = os.environ.get("LOLDU_PROGRESS", "auto").strip().lower() or "auto"
    if m not in MODES:
        m = "auto"
    if m == "auto":
        stream = sys.stderr
        try:
            return "bar" if stream is not None and stream.isatty() else "lines"
        except (AttributeError, ValueError):  # a closed or odd stream
            return "lines"
    return m


class Progress:
    """`with Progress(total, "loldu: factorizing", "layers", enabled) as p: ... p.update(n)`."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.mode = mode() if enabled else "off"
        self.bar: Optional[tqdm] = None
        self.done = 0
        self.t0 = 0.0

    def __enter__(self) -> "Progress":
        self.t0 = time.perf_counter()
        if self.mode == "bar":
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False, file=sys.stderr)
        elif self.mode == "lines":
            print(f"{self.desc}: {self.total} {self.unit}...", file=sys.stderr, flush=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        if exc_type is None and self.mode == "lines":
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} done in {time.perf_counter() - self.t0:.1f} s",
                  file=sys.stderr, flush=True)
