"""What the module's own tests (test_transfer_worker.py) share with the tests under tests/: a
clock moved by hand. The protocol servers' fixtures are in tests/conftest.py."""

from __future__ import annotations


class Clock:
    """A clock tests move by hand (epoch seconds), injected where the worker takes ``clock``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
