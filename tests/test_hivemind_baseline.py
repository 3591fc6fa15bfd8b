"""bench/netlab/hivemind_baseline.py: hivemind.Optimizer peers on hometrain's model, data and AdamW.

The unit tests check what the baseline shares with hometrain (seeded weights, the mixer's rows,
disjoint shards) and that every --compression decodes here; the swarm test runs two peers on
loopback for a few hivemind epochs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from proto.lifecycle import ask_for_death_signal

from .swarm import ENV, ROOT, seeded_model

SCRIPT = ROOT / "bench" / "netlab" / "hivemind_baseline.py"
EPOCHS = 3


def load_script():
    """The script as a module (bench/netlab is not a package)."""
    spec = importlib.util.spec_from_file_location("hivemind_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baseline():
    return load_script()


def test_model_and_data_are_hometrains(baseline):
    from coordinator.data.build import build_mixer
    from coordinator.model_presets import preset_config
    from proto.manifest import parameter_checksum
    from proto.run_config import CoordinatorConfig

    cfg = baseline.BaselineConfig(num_peers=2, peer_index=1)
    tokenizer, mixer = baseline.build_data(cfg)
    model = baseline.build_model(cfg, tokenizer)
    reference = seeded_model(preset_config("tiny", len(tokenizer), tokenizer.eos_token_id, cfg.seq_len), cfg.seed)
    assert parameter_checksum(model) == parameter_checksum(reference), "not the weights hometrain's peers build from the seed"
    assert model.config.n_layer == 4 and model.config.n_embd == 128

    # The rows of a hometrain run with --ul2-tokens 0 --instruction-share 0, peers taking alternate microbatches.
    hometrain = build_mixer(CoordinatorConfig(ul2_tokens=0, instruction_share=0), tokenizer)
    per_round = cfg.train.microbatches_per_round
    zero = baseline.BaselineConfig(num_peers=2, peer_index=0)
    for k in range(3):
        for peer, index in ((zero, 0), (cfg, 1)):
            g = 2 * k + index
            mine = baseline.microbatch_for(mixer, peer, k)
            theirs = hometrain.microbatch(g // per_round + 1, g % per_round, cfg.micro_batch_size, 0)
            assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.loss_mask, theirs.loss_mask)
            assert mine.prefix_lengths.eq(0).all() and mine.loss_mask.eq(1).all(), "not a plain causal row"
    assert not torch.equal(baseline.microbatch_for(mixer, zero, 0).input_ids, baseline.microbatch_for(mixer, cfg, 0).input_ids)


def test_every_compression_round_trips(baseline):
    from hivemind.compression import serialization
    from hivemind.compression.base import CompressionInfo

    saved = dict(serialization._BASE_COMPRESSION_TYPES)
    try:
        baseline._patch_quantized_decoders()
        x = torch.randn(300, 400) * 1e-3  # above size-adaptive's threshold: its 8-bit half is used
        for name in baseline.COMPRESSIONS:
            compression = baseline.make_compression(name)
            restored = serialization.deserialize_torch_tensor(compression.compress(x, CompressionInfo.from_tensor(x)))
            error = float((restored - x).norm() / x.norm())
            assert restored.shape == x.shape and error < 0.05, f"{name}: relative error {error}"
    finally:
        serialization._BASE_COMPRESSION_TYPES.clear()
        serialization._BASE_COMPRESSION_TYPES.update(saved)


def test_bad_settings_exit_2_with_the_flag_named():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--peer-index", "2", "--num-peers", "2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--peer-index" in proc.stderr, proc.stderr


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=ask_for_death_signal)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the DHT, averager and p2pd processes it started
        proc.wait()


@pytest.mark.swarm
def test_two_peers_train_together_on_loopback(tmp_path):
    common = ["--num-peers", "2", "--epochs", str(EPOCHS), "--compression", "fp16", "--run-id", f"test-{uuid.uuid4().hex[:8]}",
              "--matchmaking-time", "0.5", "--refresh-period", "0.1", "--timeout", "80", "--linger", "10"]
    logs = [tmp_path / "peer0.log", tmp_path / "peer1.log"]
    outs = [tmp_path / "peer0.json", tmp_path / "peer1.json"]
    procs = [_start([*common, "--peer-index", "0", "--out", str(outs[0])], logs[0])]
    try:
        deadline = time.monotonic() + 60
        maddrs = None
        while maddrs is None:
            lines = [line for line in logs[0].read_text().splitlines() if line.startswith("MADDRS ")]
            if lines:
                maddrs = json.loads(lines[0][len("MADDRS "):])
            elif procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"peer 0 printed no MADDRS line (exit {procs[0].poll()}):\n{logs[0].read_text()[-3000:]}")
            else:
                time.sleep(0.2)
        assert maddrs and all("/p2p/" in m for m in maddrs), maddrs
        procs.append(_start([*common, "--peer-index", "1", "--initial-peers", *maddrs, "--out", str(outs[1])], logs[1]))
        for proc, log in zip(procs, logs):
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a peer did not exit in time despite --timeout:\n{log.read_text()[-3000:]}")
            assert proc.returncode == 0, f"exit {proc.returncode}:\n{log.read_text()[-3000:]}"
    finally:
        for proc in procs:
            _stop(proc)

    results = [json.loads(out.read_text()) for out in outs]
    for r in results:
        assert r["status"] == "ok" and r["epochs"] == EPOCHS == r["epochs_target"], r
        assert len(r["epoch_losses"]) == EPOCHS and all(x is not None and math.isfinite(x) for x in r["epoch_losses"]), r["epoch_losses"]
        assert r["final_loss"] < r["epoch_losses"][0], f"loss did not fall: {r['epoch_losses']}"
        assert r["tokens_per_second"] > 0 and r["samples"] > 0 and r["tokens"] == r["samples"] * r["settings"]["config"]["seq_len"]
        assert r["bytes_sent"] is None and "interface_bytes" in r
    assert results[0]["settings"]["model"]["initial_checksum"] == results[1]["settings"]["model"]["initial_checksum"]
    samples = sum(r["samples"] for r in results)
    rate = sum(r["tokens_per_second"] for r in results)
    print(f"\nhivemind baseline, 2 peers on loopback, fp16: {EPOCHS} epochs, {samples} samples, {rate:.0f} tokens/s together "
          f"(per peer {[round(r['tokens_per_second']) for r in results]}), losses {[round(x, 3) for x in results[0]['epoch_losses']]}")
