"""The held-out split: a fixed share of every source's documents or records that training never sees.

Membership is a hash of the item's content (a document's text; a record's prompt and
completion), never its position, so the split does not move when a file is reordered or
grows, and an item is held out in every run that holds out the same share: the evaluation of
one checkpoint is comparable with the next.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

Item = TypeVar("Item", str, tuple[str, str])
HASH_SPACE = 1 << 64


def content_key(item: str | tuple[str, str]) -> bytes:
    """The bytes an item's membership is decided by."""
    return item.encode() if isinstance(item, str) else item[0].encode() + b"\0" + item[1].encode()


def is_heldout(item: str | tuple[str, str], share: float) -> bool:
    """Whether ``item`` is in the held-out ``share`` (0..1) of any source."""
    digest = hashlib.blake2b(content_key(item), digest_size=8, person=b"ht-heldout").digest()
    return int.from_bytes(digest, "big") < share * HASH_SPACE


def split_heldout(items: Sequence[Item], share: float) -> tuple[list[Item], list[Item]]:
    """(training items, held-out items), each in the source's order."""
    train: list[Item] = []
    held: list[Item] = []
    for item in items:
        (held if share > 0 and is_heldout(item, share) else train).append(item)
    return train, held
