"""Progress: extraction progress forwarded to whoever listens (the CLI's progress bar)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[int, int, int], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Receive (done, total, errors) reports while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(done: int, total: int, errors: int) -> None:
    """Tell every listener how far extraction has come."""
    for listener in list(_listeners):
        listener(done, total, errors)
