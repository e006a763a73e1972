"""Progress: how far a long stage has come (files extracted, models fitted), forwarded to whoever listens (the CLI's
progress bars)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Report:
    """How far a stage (`extract`, the training sample's `read`, `fit`) has come: `done` of `total` (files, batches,
    fits), errors so far, what is in work."""

    stage: str
    done: int
    total: int
    errors: int = 0
    note: str = ""


Listener = Callable[[Report], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Receive the reports of every stage while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(news: Report) -> None:
    """Tell every listener how far a stage has come."""
    for listener in list(_listeners):
        listener(news)
