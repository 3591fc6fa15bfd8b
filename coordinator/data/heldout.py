"""The held-out split: a fixed share of every source's documents or records that training never sees.

Membership is a hash of the item's content (a document's text; a record's prompt and
completion), never its position, so the split does not move when a file is reordered or
grows, and an item is held out in every run that holds out the same share: the evaluation of
one checkpoint is comparable with the next.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, TypeVar

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


SPLIT_FILE = "split.json"


def split_file_name(index: int, source: str) -> str:
    """The file of a source's held-out items: numbered, then its name with anything but [A-Za-z0-9_.-] replaced,
    so that any source name makes a plain file name (and URL) that no server hides."""
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', source)[:60]}.jsonl"


def write_heldout(directory: Path, share: float, heldout: Mapping[str, Sequence[str | tuple[str, str]]]) -> None:
    """Save each source's held-out items as a JSONL file (``{"text"}`` or ``{"prompt", "completion"}`` lines) with
    ``split.json`` naming the share, the sources and their files, so that ``coordinator eval`` reads the split as it
    was carved, with no access to the run's data or config. Rewritten whole (a restart may change a source)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: split_file_name(i, name) for i, name in enumerate(heldout)}
    for stale in directory.glob("*.jsonl"):
        if stale.name not in files.values():
            stale.unlink()
    for name, items in heldout.items():
        lines = [json.dumps({"text": i} if isinstance(i, str) else {"prompt": i[0], "completion": i[1]}) for i in items]
        tmp = directory / f".{files[name]}.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        tmp.replace(directory / files[name])
    meta = {"share": share, "sources": {n: len(v) for n, v in heldout.items()}, "files": files}
    (directory / SPLIT_FILE).write_text(json.dumps(meta, indent=1))


@dataclass(frozen=True)
class HeldoutSplit:
    """A saved split: its share and, per source, its documents (str) or records ((prompt, completion))."""

    share: float
    sources: dict[str, list[str | tuple[str, str]]]


def read_heldout(directory: Path) -> HeldoutSplit:
    """The split ``write_heldout`` saved in ``directory``; ValueError saying what is missing or malformed."""
    meta_path = directory / SPLIT_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory} holds no {SPLIT_FILE}: not a held-out split (a coordinator writes one to STATE_DIR/heldout)")
    meta = json.loads(meta_path.read_text())
    sources: dict[str, list[str | tuple[str, str]]] = {}
    for name in meta.get("sources", {}):
        items: list[str | tuple[str, str]] = []
        path = directory / meta.get("files", {}).get(name, f"{name}.jsonl")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            record = json.loads(line)
            if isinstance(record.get("text"), str):
                items.append(record["text"])
            elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
                items.append((record["prompt"], record["completion"]))
            else:
                raise ValueError(f"{path} line {number}: expected {{\"text\"}} or {{\"prompt\", \"completion\"}}, got keys {sorted(record)}")
        sources[name] = items
    return HeldoutSplit(float(meta["share"]), sources)
