"""A bounded least-recently-used map shared by a worker's threads, bounded in entries and in bytes.

Kept work is keyed by the exact JSON text it was computed from (validation outcomes by resource,
answers by request), so its size is counted as the bytes of those keys: `size_of(key)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class KeptLru(Generic[K, V]):
    def __init__(self, entries: int, max_bytes: int, size_of: Callable[[K], int]) -> None:
        self._entries, self._max_bytes, self._size_of = entries, max_bytes, size_of
        self._kept: OrderedDict[K, V] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._kept.get(key)
            if value is not None:
                self._kept.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            if key in self._kept:
                return
            self._kept[key] = value
            self._size += self._size_of(key)
            while len(self._kept) > self._entries or self._size > self._max_bytes:
                old, _ = self._kept.popitem(last=False)
                self._size -= self._size_of(old)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._size = 0

    def __len__(self) -> int:
        return len(self._kept)
