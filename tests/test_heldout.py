"""The held-out split (coordinator.data.heldout): chosen by content, stable, and never handed out for training."""

from __future__ import annotations

import pytest

from coordinator.data.corpus import builtin_documents
from coordinator.data.heldout import is_heldout, split_heldout
from coordinator.data.mixer import DataMixer, PhaseConfig, builtin_sources
from coordinator.data.tokenizer import train_tokenizer

SHARE = 0.05
PROBE = 24  # characters of a held-out document that appear in no training document


def test_the_split_is_by_content_not_position():
    docs = builtin_documents()
    train, held = split_heldout(docs, SHARE)
    assert len(train) + len(held) == len(docs) and 0.02 < len(held) / len(docs) < 0.09
    shuffled_train, shuffled_held = split_heldout(list(reversed(docs)), SHARE)
    assert set(shuffled_held) == set(held) and set(shuffled_train) == set(train)  # reordering the file moves nothing
    assert split_heldout(docs[:100], SHARE)[1] == [d for d in held if d in docs[:100]]  # nor does truncating it
    assert set(split_heldout(docs, 2 * SHARE)[1]) >= set(held)  # a larger share holds out a superset
    assert split_heldout(docs, 0.0) == (list(docs), [])
    assert is_heldout(("prompt", "completion"), 1 - 1e-12) and not is_heldout(("prompt", "completion"), 0.0)


def probes(held: list[str], train: list[str]) -> list[str]:
    """For each held-out document, a stretch of its text that no training document contains."""
    corpus = "\n".join(train)
    found = []
    for doc in held:
        middle = len(doc) // 2
        for start in range(max(0, middle - 200), min(len(doc) - PROBE, middle + 200), 16):
            piece = doc[start : start + PROBE]
            if piece.strip() and piece not in corpus:
                found.append(piece)
                break
    return found


@pytest.mark.parametrize("objective", ["causal", "ul2"])
def test_no_held_out_document_is_ever_handed_out(objective):
    text, instructions = builtin_sources()
    docs = builtin_documents()
    train, held = split_heldout(docs, SHARE)
    tokenizer = train_tokenizer(train[:200], 400)
    if objective == "ul2":
        from coordinator.data.ul2 import add_ul2_tokens

        add_ul2_tokens(tokenizer)
    mixer = DataMixer((text,), (PhaseConfig(objective, 0, {text.name: 1.0}),), tokenizer, 64, 0, heldout_share=SHARE)
    assert mixer.heldout[text.name] == held and mixer.describe()["sources"][0]["heldout"] == len(held)
    held_probes, train_probes = probes(held, train), probes(train[:60], held)
    assert len(held_probes) >= 0.8 * len(held)
    seen = ""
    for round in range(1, 121):  # 120 rounds of 4 microbatches of 16 rows: the 697-document corpus many times over
        for index in range(4):
            batch = mixer.microbatch(round, index, 16, 0)
            seen += "\n".join(tokenizer.batch_decode(batch.input_ids.tolist()))
    assert not [p for p in held_probes if p in seen], "a held-out document reached training"
    # The check can fail: training documents' own stretches do show up in what was handed out.
    assert sum(p in seen for p in train_probes) > 0.5 * len(train_probes)


def test_held_out_records_of_an_instruction_source_stay_out():
    _, instructions = builtin_sources()
    from coordinator.data.mixer import SourceConfig, load_source

    source = SourceConfig(instructions.name, instructions.path, instructions.format, 1.0, max_records=400)
    records = load_source(source)
    train, held = split_heldout(records, SHARE)
    tokenizer = train_tokenizer([p + c for p, c in train[:200]], 400)
    mixer = DataMixer((source,), (PhaseConfig("causal", 0, {source.name: 1.0}),), tokenizer, 64, 0, heldout_share=SHARE)
    assert mixer.heldout[source.name] == held and held
    seen = set()
    for round in range(1, 41):
        for index in range(4):
            for row in mixer.microbatch(round, index, 16, 0).input_ids.tolist():
                seen.add(tokenizer.decode(row))
    train_text = "\n".join(p + c for p, c in train)
    held_completions = {c.strip() for _, c in held if len(c.strip()) >= PROBE and c.strip() not in train_text}
    assert held_completions and not [c for c in held_completions if any(c in s for s in seen)]
