"""Progress events: stages emit them, fronts (CLI, TUI) render them. Nothing else flows back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["start", "progress", "log", "warning", "result", "done"]


@dataclass
class Event:
    """One thing a stage has to say. `done`/`total` count the current task's units."""

    stage: str
    kind: Kind
    message: str = ""
    task: str = ""
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def eta(self) -> float | None:
        if self.kind != "progress" or self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed / self.done * (self.total - self.done)


Callback = Callable[[Event], None]


def _ignore(event: Event) -> None:
    pass


class Reporter:
    """What a stage holds to emit events: `with rep.task("scoring", total=n): rep.advance()`."""

    def __init__(self, stage: str, callback: Callback | None = None):
        self.stage = stage
        self.callback = callback or _ignore
        self._task = ""
        self._total = 0
        self._done = 0
        self._t0 = time.perf_counter()

    def emit(self, kind: Kind, message: str = "", **data: Any) -> None:
        self.callback(
            Event(
                self.stage,
                kind,
                message,
                self._task,
                self._done,
                self._total,
                time.perf_counter() - self._t0,
                data,
            )
        )

    def start(self, message: str = "") -> None:
        self.emit("start", message)

    def log(self, message: str, **data: Any) -> None:
        self.emit("log", message, **data)

    def warn(self, message: str, **data: Any) -> None:
        self.emit("warning", message, **data)

    def result(self, message: str, **data: Any) -> None:
        self.emit("result", message, **data)

    def task(self, name: str, total: int) -> Reporter:
        self._task, self._total, self._done = name, total, 0
        self._t0 = time.perf_counter()
        self.emit("progress", name)
        return self

    def advance(self, n: int = 1, **data: Any) -> None:
        self._done += n
        self.emit("progress", self._task, **data)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._task, self._total, self._done = "", 0, 0
