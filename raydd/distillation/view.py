"""One live view of a distillation run: a tqdm bar on a terminal, else a status line every 10 s."""
from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any, Callable

from .plan import GroupPlan

ProgressArg = bool | Callable[[dict[str, Any]], None]


class LiveView:
    """One view of the whole run: a tqdm bar on a terminal, else a status line every 10 s.

    ``progress`` may also be a callable, which then receives every message instead.
    The rate/ETA clock starts at the first finished round, not when the view is made: Ray's
    start, the teacher service's loading and each worker's set-up would otherwise count as
    slow rounds and the ETA would start far too long.
    """

    LINE_EVERY_S = 10.0

    def __init__(self, plans: list[GroupPlan], progress: ProgressArg):
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and self.callback is None
        self.done = {p.index: p.final_path.exists() for p in plans}
        self.rounds = {p.index: p.rounds if self.done[p.index] else p.read_progress()["round"] for p in plans}
        self.last: dict[int, dict[str, Any]] = {}
        self.total = sum(p.rounds for p in plans)
        self.initial = sum(self.rounds.values())
        self.t0 = self.last_line = time.monotonic()
        self.clock_started = False
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.initial, unit="round", desc="distill",
                            file=sys.stderr, dynamic_ncols=True)

    def handle(self, msg: dict[str, Any]) -> None:
        if not self.clock_started and msg.get("kind") in ("round", "checkpoint", "done"):
            self._start_clock(msg)
        if self.callback is not None:
            self.callback(msg)
            return
        g = msg["group"]
        self.rounds[g] = msg["round"]
        self.last[g] = msg
        kind = msg["kind"]
        if kind == "start" and msg.get("start", 1) > 1:
            self.note(f"group {g} restarted (start #{msg['start']}) from its checkpoint at round {msg['round']}"
                      f" on {msg['host']} pid {msg['pid']}")
        elif kind == "rollback":
            self.note(f"group {g}: images went non-finite in round {msg['failed']}; rolled back to round "
                      f"{msg['round']} ({msg['rollbacks']} rollback(s) so far)")
        elif kind == "done":
            self.done[g] = True
        self.refresh()

    def _start_clock(self, msg: dict[str, Any]) -> None:
        self.clock_started = True
        self.rounds[msg["group"]] = msg["round"]
        self.t0, self.initial = time.monotonic(), sum(self.rounds.values())
        if self.bar is not None:   # tqdm's own rate: from here, counting only the rounds after it
            self.bar.reset(total=self.total)
            self.bar.initial = self.bar.n = self.initial

    def note(self, text: str) -> None:
        if self.callback is not None or not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[distill] {text}", file=sys.stderr)
        else:
            print(f"[distill] {text}", file=sys.stderr, flush=True)

    def _groups_text(self) -> str:
        parts = []
        for g in sorted(self.rounds):
            m = self.last.get(g, {})
            state = "done" if self.done[g] else f"r{self.rounds[g]}"
            loss = f" L{m['loss']:.3g}" if m.get("loss") is not None else ""
            rate = f" {m['rate']:.2g}r/s" if m.get("rate") and not self.done[g] else ""
            parts.append(f"g{g} {state}{loss}{rate}")
        return " | ".join(parts)

    def refresh(self, force: bool = False) -> None:
        if not self.enabled:
            return
        done = sum(self.rounds.values())
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self._groups_text(), refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if not force and now - self.last_line < self.LINE_EVERY_S:
            return
        self.last_line = now
        rate = (done - self.initial) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
        print(f"[distill] {done}/{self.total} rounds ({done / max(self.total, 1):.0%}) "
              f"{rate:.2f} rounds/s ETA {eta_text} | {self._groups_text()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self.refresh(force=True)
