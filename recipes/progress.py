"""Progress for long loops: tqdm's bar on a terminal; piped into a file or CI log, where a bar
redrawn with carriage returns becomes one enormous line, a plain line at each quarter with
the rate and an ETA."""

from __future__ import annotations

import os
import sys
import time


class _Lines:
    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.done, self.next_quarter = total, desc, unit, 0, 1
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        while self.total and self.next_quarter <= 4 and self.done * 4 >= self.next_quarter * self.total:
            elapsed = time.perf_counter() - self.start
            rate = self.done / max(elapsed, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({25 * self.next_quarter}%), "
                  f"{rate:.1f} {self.unit}/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)
            self.next_quarter += 1

    def close(self) -> None:
        pass


class _Off:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str, enabled: bool = True):
    if not enabled or os.environ.get("TQDM_DISABLE") == "1":
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Lines(total, desc, unit)
