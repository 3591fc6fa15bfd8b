"""A byte-level BPE tokenizer trained on the run's corpus: no download, saved with checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE of ``vocab_size`` entries (deterministic for the same input)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + merges); use >= 300")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def load_or_train(directory: Path, documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """The run's tokenizer: loaded from ``directory`` if saved there, else trained and saved."""
    if (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory))
    tokenizer = train_tokenizer(documents, vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
