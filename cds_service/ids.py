"""Unique ids without a getrandom system call each: random bits drawn once per process (again in a
forked child, so gunicorn's workers never share them) and a counter."""

from __future__ import annotations

import itertools
import os
import weakref


class UniqueIds:
    """`next_id()`: 16 random hex digits of this process, then a 16-digit counter."""

    def __init__(self) -> None:
        self._reseed()
        _all.add(self)

    def _reseed(self) -> None:
        self._prefix, self._counter = os.urandom(8).hex(), itertools.count()

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"  # next() on a count is atomic under the GIL


_all: weakref.WeakSet[UniqueIds] = weakref.WeakSet()


def _reseed_all() -> None:
    for ids in list(_all):
        ids._reseed()


os.register_at_fork(after_in_child=_reseed_all)
