"""SIGTERM and SIGINT become an exception in the main thread, so that a run unwinds as a crash would and releases its lease."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The process got SIGTERM or SIGINT; a BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def exit_status(signum: int) -> int:
    """The shell's exit status of a process ended by this signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    """SIGTERM, SIGINT, ..."""
    return signal.Signals(signum).name


def signal_number(e: BaseException) -> int | None:
    """The signal an exception stands for: Interrupted, KeyboardInterrupt, or Prefect's TerminationSignal; None otherwise."""
    if isinstance(e, Interrupted):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return signal.SIGINT
    if type(e).__name__ == "TerminationSignal" and isinstance(getattr(e, "signal", None), int):
        return e.signal
    return None


def interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler: ignore further SIGTERM/SIGINT (the unwinding must finish) and raise Interrupted."""
    for handled in HANDLED:
        signal.signal(handled, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into Interrupted in the main thread while the block runs."""
    previous = {s: signal.signal(s, interrupt) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
