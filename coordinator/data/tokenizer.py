"""The run's tokenizer: a byte-level BPE trained on the run's corpus (no download), or a saved
Hugging Face tokenizer the organiser points at (``--tokenizer``, e.g. GPT-J's); saved with checkpoints.

Special tokens (UL2's mode tokens and sentinels, ``coordinator.data.ul2.special_tokens()``) are
trained in as special tokens, so they get stable ids inside ``vocab_size``; a loaded tokenizer
that lacks them gets them appended after its vocabulary (the model's embedding must cover
``len(tokenizer)``, which the coordinator checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def _specials(special_tokens: Sequence[str]) -> list[str]:
    """END_OF_TEXT first (id 0 in a trained tokenizer), then the others, without duplicates."""
    return [END_OF_TEXT, *(t for t in dict.fromkeys(special_tokens) if t != END_OF_TEXT)]


def train_tokenizer(documents: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE of ``vocab_size`` entries (deterministic for the same input).

    ``special_tokens`` (besides END_OF_TEXT, which is always id 0) are trained in as special
    tokens: ids ``1 .. len(special_tokens)``, inside ``vocab_size``, never split, never merged.
    """
    specials = _specials(special_tokens)
    minimum = 299 + len(specials)  # 256 bytes, the specials, and some merges
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE with {len(specials)} special tokens "
            f"(256 bytes + specials + merges); use >= {minimum}"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(documents, trainer=trainer)
    extra = {"additional_special_tokens": specials[1:]} if len(specials) > 1 else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT, pad_token=END_OF_TEXT, **extra
    )


def missing_tokens(tokenizer: Any, special_tokens: Sequence[str]) -> list[str]:
    """Those of ``special_tokens`` the tokenizer does not hold as single tokens."""
    vocab = tokenizer.get_vocab()
    return [t for t in dict.fromkeys(special_tokens) if t not in vocab]


def ensure_special_tokens(tokenizer: Any, special_tokens: Sequence[str]) -> int:
    """Add the missing ``special_tokens`` (new ids after the vocabulary); returns how many were added."""
    missing = missing_tokens(tokenizer, special_tokens)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)  # never split, skipped when decoding; same call in transformers 4 and 5
    return len(missing)


def load_pretrained(path: str | Path, special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A saved Hugging Face tokenizer directory (``--tokenizer``), with ``special_tokens`` added if it lacks them.

    Read from disk only (no hub download). Its EOS token (or END_OF_TEXT, if it holds that)
    separates documents and pads rows.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"--tokenizer {path}: no such directory; point it at a saved Hugging Face tokenizer (tokenizer.json or vocab files)")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.eos_token_id is None:
        if END_OF_TEXT not in tokenizer.get_vocab():
            raise ValueError(f"--tokenizer {path}: the tokenizer has no EOS token (nor {END_OF_TEXT}); rows need one between documents")
        tokenizer.eos_token = END_OF_TEXT
    ensure_special_tokens(tokenizer, special_tokens)
    return tokenizer


def load_or_train(
    directory: Path, documents: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (), pretrained: str | Path = ""
) -> PreTrainedTokenizerFast:
    """The run's tokenizer, with ``special_tokens``: loaded from ``directory`` if saved there (a
    restart: the same ids), else loaded from ``pretrained`` if given, else trained on
    ``documents`` (consumed only then); saved to ``directory`` whenever it changed."""
    if (directory / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        changed = ensure_special_tokens(tokenizer, special_tokens) > 0  # a run started before the tokens existed
    elif pretrained:
        tokenizer, changed = load_pretrained(pretrained, special_tokens), True
    else:
        tokenizer, changed = train_tokenizer(documents, vocab_size, special_tokens), True
    if changed:
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(directory))
    return tokenizer
