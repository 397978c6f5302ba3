"""What a training run tells the person waiting for it: a live bar on a terminal, plain lines in logs.

`lines` is also the form for runs that share a terminal (two `vit-train`s side by side): every
line starts with the task's name and is written whole, so lines of two runs never tear each other.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "off")
LINE_INTERVAL_S = 5.0  # `lines` reports the step this often, besides every validation


def resolve(mode: str) -> str:
    """`auto`: a bar when stderr is a terminal, lines otherwise (a bar in a log file is noise)."""
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


class Progress:
    def __init__(self, mode: str, name: str, total_steps: int, start_step: int) -> None:
        self.mode, self.name, self.total = resolve(mode), name, total_steps
        self.start_step, self.started = start_step, time.perf_counter()
        self.last_line = self.started
        self.last_loss: float | None = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True) if self.mode == "bar" else None

    def say(self, text: str) -> None:
        if self.mode == "off":
            return
        line = f"{self.name}: {text}"
        self.last_line = time.perf_counter()
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def step(self, step: int, loss: float | None, val: dict[str, float]) -> None:
        """After each optimizer step; `loss` is the (rank-averaged) training loss on the steps that log it."""
        if loss is not None:
            self.last_loss = loss
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", **{f"val_{k}": f"{v:.4f}" for k, v in val.items()})
        elif self.mode == "lines" and time.perf_counter() - self.last_line >= LINE_INTERVAL_S and step < self.total:
            done = step - self.start_step
            left = self.elapsed() / done * (self.total - step)
            self.say(f"step {step}/{self.total} ({100 * step // self.total}%), {self.elapsed():.0f} s, about {left:.0f} s left"
                     + (f", loss {self.last_loss:.4f}" if self.last_loss is not None else ""))

    def validated(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:  # the bar's last line shows the latest validation, not the one before
            self.bar.set_postfix(**({"loss": f"{self.last_loss:.4f}"} if self.last_loss is not None else {}),
                                 **{f"val_{k}": f"{v:.4f}" for k, v in metrics.items()})
        self.say(f"step {step}/{self.total}, {self.elapsed():.0f} s: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
