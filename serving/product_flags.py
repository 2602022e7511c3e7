"""Products' availability and promotion flags as the gateway's rules read them, and the in-process cache that keeps
them for a few seconds, so that a precomputed hit reads no database (serving/recommender.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class ProductFlags:
    available: bool
    promoted: bool


NIGHTLY_VIEW = ProductFlags(available=True, promoted=False)



class ProductFlagsCache:
    """Products' flags (None: a product the database does not know) for at most `ttl_s`.

    Two generations of plain dicts: every `ttl_s` (or when it holds `max_entries`) the current one becomes
    the previous one and a new one starts, so an entry is current for at most `ttl_s`, and the previous
    generation answers only while the database cannot. A lookup is one dict operation: cachetools' TTLCache
    cost about 3 us an item, a third of a millisecond for a 100-item list, most of a precomputed hit's CPU
    (benchmarks/serving.py)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.current: dict[int, ProductFlags | None] = {}
        self.previous: dict[int, ProductFlags | None] = {}
        self._rotate_at = time.monotonic() + ttl_s

    def rotate_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._rotate_at or len(self.current) >= self.max_entries:
            self.previous, self.current = self.current, {}
            self._rotate_at = now + self.ttl_s

    def forget(self, product_id: int) -> None:
        self.current.pop(product_id, None)
        self.previous.pop(product_id, None)

    def last_known(self, items: Sequence[int]) -> dict[int, ProductFlags]:
        """Flags of the products known to the database, from the previous generation where the current one
        lacks them: only while the database cannot be read."""
        current, previous = self.current, self.previous
        found = {item: flags for item in items if (flags := current.get(item)) is not None}
        for item in items:
            if item not in current and (flags := previous.get(item)) is not None:
                found[item] = flags
        return found
