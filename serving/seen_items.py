"""Items a customer interacted with since the nightly run: kept out of their lists at once (the spec's
`exclude_seen`, issue "seen items excluded").

The nightly run excludes what it saw (`tasks.batch_score.seen_items_by_user`, in the batch lists and in
Triton). What arrives through the API later is noted here: when the interactions route stores an interaction
of a type the spec's rule counts, it adds the product to the customer's Redis set `<prefix>seen:<customer>`,
whose TTL (renewed by every addition) outlasts the next nightly runs that will have the interaction in their
data; the recommender reads the set in the round trip that reads the list and drops its items, whatever
route answered (precomputed, online, generic, browsing now).

A failed write (Redis down or slow) leaves the interaction stored and acknowledged: the next nightly run
excludes the item; until then it may be recommended again. Deleting a customer deletes their set.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 3 * 24 * 3600  # a missed nightly run or two


def seen_key(key_prefix: str, customer_id: int) -> str:
    return f"{key_prefix}seen:{customer_id}"


class SeenItemsWriter:
    """Adds a customer's interacted products to their set (a synchronous client: the routes that call it run
    in threads), each call bounded by the client's socket timeouts. `types`: `recsys.interactions.
    types_excluding_seen` of the spec."""

    def __init__(self, client: Any, key_prefix: str, types: frozenset[str], ttl_s: int = DEFAULT_TTL_S) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.types = types
        self.ttl_s = ttl_s

    def note(self, customer_id: int, product_id: int, interaction_type: str) -> bool:
        """Whether the product is now kept out of the customer's lists (False: not counted, or not written)."""
        if interaction_type not in self.types:
            return False
        key = seen_key(self.key_prefix, customer_id)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(key, product_id)
            pipe.expire(key, self.ttl_s)
            pipe.execute()
        except Exception as error:  # the interaction is stored: the next nightly run excludes the item
            log.warning("seen item of customer %s not noted (%s): excluded from the next nightly run on",
                        customer_id, type(error).__name__)  # fmt: skip
            return False
        return True

    def forget(self, customer_id: int) -> None:
        try:
            self.client.delete(seen_key(self.key_prefix, customer_id))
        except Exception as error:  # expires with its TTL
            log.warning("seen items of deleted customer %s not deleted (%s): they expire in %d s", customer_id,
                        type(error).__name__, self.ttl_s)  # fmt: skip

    def close(self) -> None:
        self.client.close()
