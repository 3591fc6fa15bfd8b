"""Multiple-choice evaluation items: the built-in instruction probe and the organiser's own task files.

The built-in probe asks the classification questions of the built-in instruction data
(parity and sentiment, whose answers come from a closed set of labels). Its items are
generated from a stream of their own and kept only if their content is in the held-out share
(``heldout.is_heldout``, the rule that keeps them out of training) and no training record asks
about the same number or review under another template, so no probe question, nor its subject,
is ever trained on; its few-shot demonstrations are drawn from the training side. An
organiser's task is a JSONL file of ``{"prompt": str, "choices": [str, ...], "answer": int}``
lines; its demonstrations are other items of the same file, as lm-evaluation-harness draws
them when a task has no separate few-shot split.

As in lm-evaluation-harness, a choice is scored as the continuation ``TARGET_DELIMITER +
choice`` of its context, and a demonstration reads ``prompt + TARGET_DELIMITER + answer``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .heldout import is_heldout
from .instructions import GENERATORS, builtin_instruction_records
from .mixer import BUILTIN_INSTRUCTION_RECORDS

TARGET_DELIMITER = " "
LABEL_TASKS: dict[str, tuple[str, ...]] = {"parity": ("even", "odd"), "sentiment": ("positive", "negative")}
PROBE_STREAM = 0x70726F6265  # the probe's own random stream, apart from the training records'
CANDIDATES_PER_ITEM = 400    # how far the probe looks for held-out questions before settling for fewer ...
PATIENCE = 20                # ... or once 20 / share questions in a row brought no new one (the task has no more)


@dataclass(frozen=True)
class ChoiceItem:
    """One question: ``prompt`` (ending with its answer cue), its ``choices`` (no leading space) and the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    shots: tuple[tuple[str, str], ...] = ()  # (prompt, answer text) demonstrations put before it


def _label_question(task: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A generated record of ``task`` in its label form (the completion is one label), else None."""
    prompt, completion = GENERATORS[task](rng)
    label = completion.strip()
    return (prompt, label) if completion == TARGET_DELIMITER + label and label in LABEL_TASKS[task] else None


def subject(task: str, prompt: str) -> str:
    """What a question asks about, whatever its template: the number (parity) or the review (sentiment)."""
    found = re.search(r"\d+", prompt) if task == "parity" else re.search(r"(?:Review|Sentence): ([^\n]*)", prompt)
    return found.group(found.re.groups) if found else prompt


def trained_subjects(share: float, records: int = BUILTIN_INSTRUCTION_RECORDS) -> dict[str, set[str]]:
    """Per probe task, the subjects of the built-in records that training may see (its first ``records``, less the
    held-out share). The held-out hash is of a whole record, and the same review or number can come up in training
    under another template: a probe question about such a subject would measure memory, not skill."""
    seen: dict[str, set[str]] = {task: set() for task in LABEL_TASKS}
    for record in builtin_instruction_records(records):
        if record["task"] in LABEL_TASKS and not is_heldout((record["prompt"], record["completion"]), share):
            seen[record["task"]].add(subject(record["task"], record["prompt"]))
    return seen


def builtin_probe(share: float, items_per_task: int, shots: int, seed: int = 0) -> dict[str, list[ChoiceItem]]:
    """Per task of ``LABEL_TASKS``, up to ``items_per_task`` distinct held-out questions about subjects training
    never sees (``trained_subjects``), each with ``shots`` demonstrations from the training side. Fewer where the
    task has few such questions."""
    if share <= 0:
        return {}
    trained = trained_subjects(share)
    tasks: dict[str, list[ChoiceItem]] = {}
    for t, task in enumerate(LABEL_TASKS):
        held: dict[tuple[str, str], None] = {}
        train: list[tuple[str, str]] = []
        questions = last_new = 0
        for i in range(items_per_task * CANDIDATES_PER_ITEM):
            if (len(held) >= items_per_task or questions - last_new > PATIENCE / share) and len(train) >= shots + 1:
                break
            record = _label_question(task, np.random.default_rng([seed, PROBE_STREAM, t, i]))
            if record is None:
                continue
            questions += 1
            prompt, label = record
            if is_heldout((prompt, TARGET_DELIMITER + label), share):  # the record as training reads it
                if record not in held and subject(task, prompt) not in trained[task]:
                    held[record], last_new = None, questions
            elif len(train) < 4 * shots + 8:
                train.append(record)
        labels = LABEL_TASKS[task]
        tasks[task] = [
            ChoiceItem(prompt, labels, labels.index(label), _pick_shots(train, shots, seed, j))
            for j, (prompt, label) in enumerate(held)
        ]
    return tasks


def _pick_shots(pool: list[tuple[str, str]], shots: int, seed: int, index: int, exclude: int = -1) -> tuple[tuple[str, str], ...]:
    """``shots`` demonstrations from ``pool`` for item ``index`` (never pool[exclude]), the same on every machine."""
    candidates = [k for k in range(len(pool)) if k != exclude]
    if shots <= 0 or not candidates:
        return ()
    rng = np.random.default_rng([seed, PROBE_STREAM, 1 << 20, index])
    chosen = rng.choice(len(candidates), size=min(shots, len(candidates)), replace=False)
    return tuple(pool[candidates[int(k)]] for k in chosen)


def read_choice_task(path: Path, shots: int, seed: int = 0) -> list[ChoiceItem]:
    """An organiser's multiple-choice task file (see the module docstring); ValueError names the line at fault."""
    raw: list[tuple[str, tuple[str, ...], int]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        prompt, choices, answer = (record.get(k) for k in ("prompt", "choices", "answer")) if isinstance(record, dict) else (None,) * 3
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices) and isinstance(answer, int) and 0 <= answer < len(choices)):
            raise ValueError(f'{where}: expected {{"prompt": non-empty str, "choices": [two or more non-empty str], "answer": index of '
                             f"the right choice}}, got {line[:120]!r}")
        raw.append((prompt, tuple(choices), answer))
    if not raw:
        raise ValueError(f"{path} holds no questions")
    pool = [(p, c[a]) for p, c, a in raw]
    return [ChoiceItem(p, c, a, _pick_shots(pool, shots, seed, i, exclude=i)) for i, (p, c, a) in enumerate(raw)]
