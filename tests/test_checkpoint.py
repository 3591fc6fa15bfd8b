"""Checkpoints: HF layout that transformers loads, signed manifest, atomic writes, tamper detection."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GPTJForCausalLM

from coordinator.assignment import stage_layer_ranges
from coordinator.checkpoint import load_signing_key, public_key_hex, remove_incomplete, split_state_dict, write_checkpoint
from coordinator.model_presets import preset_config
from coordinator.data.tokenizer import train_tokenizer
from proto.manifest import ManifestError, verify_directory, verify_file, verify_manifest

from .swarm import seeded_model


@pytest.fixture()
def published(tmp_path):
    tokenizer = train_tokenizer(["hello world, this is a tiny corpus " * 20, "another document about models"], 320)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    config = preset_config("tiny", len(tokenizer), tokenizer.eos_token_id, 64)
    state = seeded_model(config, seed=1).state_dict()
    stages = split_state_dict(state, stage_layer_ranges(config.n_layer, 2), config.n_layer)
    key = load_signing_key(tmp_path / "key.pem")
    info = write_checkpoint(tmp_path / "ckpt", run_id="run", round=3, tokens=100, loss=2.5, config=config,
                            stage_tensors=stages, tokenizer_dir=tok_dir, signing_key=key)
    return info, key, state


def test_checkpoint_loads_with_transformers(published):
    info, key, state = published
    manifest = verify_directory(info.path, public_key_hex(key))
    assert manifest["round"] == 3 and manifest["tokens"] == 100 and manifest["loss"] == 2.5
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "tokenizer.json"} <= set(manifest["files"])
    model = GPTJForCausalLM.from_pretrained(str(info.path))
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    tok = AutoTokenizer.from_pretrained(str(info.path))
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert not any(p.name.startswith(".tmp") for p in info.path.parent.iterdir())


def test_tampering_is_detected(published, tmp_path):
    info, key, _ = published
    shard = info.path / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match"):
        verify_directory(info.path)
    manifest = json.loads((info.path / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="sha256"):
        verify_file(shard.name, bytes(data), manifest)
    forged = {**manifest, "round": 99}
    with pytest.raises(ManifestError, match="signature"):
        verify_manifest(forged, public_key_hex(key))
    other = load_signing_key(tmp_path / "other.pem")
    with pytest.raises(ManifestError, match="signature"):
        verify_manifest(manifest, public_key_hex(other))


def test_interrupted_write_leaves_nothing_that_looks_complete(published, monkeypatch):
    info, key, state = published
    root = info.path.parent
    import coordinator.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "sign_manifest", crash)
    config = GPTJForCausalLM.from_pretrained(str(info.path)).config
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(root, run_id="run", round=4, tokens=1, loss=None, config=config, stage_tensors=[state],
                         tokenizer_dir=info.path, signing_key=key)
    assert not (root / "round-000004").exists()
    assert remove_incomplete(root) == []
    (root / ".tmp-round-000005-dead").mkdir()
    assert [p.name for p in remove_incomplete(root)] == [".tmp-round-000005-dead"]
