"""`coordinator export`: a published checkpoint as a plain Hugging Face model directory.

A full checkpoint already is one (config, safetensors shards with their index, tokenizer):
export checks every file against the manifest and copies what ``from_pretrained`` reads,
leaving out the manifest and the optimizer state. A LoRA run's checkpoint holds adapters;
``--merge`` loads them with peft onto the base the adapter config names (or ``--base``),
folds them into the weights (``merge_and_unload``) and saves a model that
``GPTJForCausalLM.from_pretrained`` loads with no peft at all. Without ``--merge`` the
adapter directory is copied as peft saves it. Merging holds the whole model in memory once,
in the base's own dtype (GPT-J-6B: about 12 GB in bf16, 24 GB in fp32).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from proto.manifest import ADAPTER_CONFIG, ADAPTER_FILE, ManifestError, is_optimizer_shard, verify_directory
from proto.run_config import ConfigError

log = logging.getLogger(__name__)



@dataclass
class ExportConfig:
    checkpoint: Path
    out: Path
    merge: bool = False
    base: Path | None = None


def export_checkpoint(config: ExportConfig) -> Path:
    """Write ``config.out`` from the checkpoint at ``config.checkpoint``; returns the directory written."""
    source, out = config.checkpoint, config.out
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory; point it at a checkpoint (e.g. STATE_DIR/checkpoints/round-000030)")
    try:
        manifest = verify_directory(source)
    except ManifestError as exc:
        raise ConfigError(f"{source} is not a complete, intact checkpoint: {exc}") from None
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; name a new directory")
    is_adapter = (source / ADAPTER_FILE).is_file()
    if config.merge and not is_adapter:
        raise ConfigError(f"--merge folds LoRA adapters into their base, but {source} is a full checkpoint; export it without --merge")
    out.mkdir(parents=True, exist_ok=True)
    if config.merge:
        load_merged(source, config.base).save_pretrained(str(out))
        # The tokenizer travels with the model; the adapters and their config are in the weights now.
        keep = [n for n in manifest["files"] if n not in (ADAPTER_FILE, ADAPTER_CONFIG, "config.json")]
    else:
        keep = list(manifest["files"])
    for name in sorted(keep):
        if not is_optimizer_shard(name):
            shutil.copy2(source / name, out / name)
    log.info("exported the checkpoint of round %s to %s%s", manifest.get("round"), out, " (adapters merged into the base)" if config.merge else "")
    return out


def load_merged(source: Path, base: Path | None):
    """A LoRA checkpoint's adapters folded into their base (``base``, else the one the adapter config names)."""
    from peft import PeftModel
    from transformers import GPTJForCausalLM

    named = json.loads((source / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path", "")
    base = base or (Path(named) if named else None)
    if base is None or not (base / "config.json").is_file():
        raise ConfigError(f"the adapters' base ({base or 'not named in ' + ADAPTER_CONFIG}) is not a model directory here; "
                          "pass --base DIR: the run's round-0 checkpoint (or the --init-from directory)")
    model = GPTJForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
    return PeftModel.from_pretrained(model, str(source)).merge_and_unload()
