"""Configs: one dataclass per process is the source of flags, TOML keys and defaults."""

from __future__ import annotations

import argparse

import pytest

from proto.run_config import ConfigError, CoordinatorConfig, PeerConfig, TrainConfig, add_arguments, load


def parse(cls, argv, toml=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return load(cls, parser.parse_args(argv), toml)


def test_toml_then_flags_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('stages = 3\nhttp-port = 9000\nlr = 0.01\nlinger = true\n')
    cfg = parse(CoordinatorConfig, ["--http-port", "9100", "--no-linger"], str(toml))
    assert (cfg.stages, cfg.http_port, cfg.lr, cfg.linger) == (3, 9100, 0.01, False)
    assert cfg.port == 50051  # untouched default


def test_unknown_toml_key_names_the_known_ones(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("stagez = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'stagez'.*stages"):
        parse(CoordinatorConfig, [], str(toml))


def test_bad_values_name_the_flag():
    with pytest.raises(ConfigError, match="--global-batch-size 10 is not a multiple of --micro-batch-size 4"):
        parse(CoordinatorConfig, ["--global-batch-size", "10"])
    with pytest.raises(ConfigError, match="--coordinator must be HOST:PORT"):
        parse(PeerConfig, ["--coordinator", "localhost"])
    with pytest.raises(ConfigError, match="--compute-dtype"):
        TrainConfig(compute_dtype="int8")


def test_cocktail_sync_starts_after_its_warmup():
    train = TrainConfig(sync_compression="cocktail", sync_warmup_rounds=3)
    assert [train.compresses_sync(r) for r in range(1, 6)] == [False, False, False, True, True]
    assert TrainConfig(sync_compression="cocktail").compresses_sync(1)
    assert not TrainConfig().compresses_sync(100)
    with pytest.raises(ConfigError, match="--sync-warmup-rounds 5 needs --sync-compression cocktail"):
        TrainConfig(sync_warmup_rounds=5)
    with pytest.raises(ConfigError, match="--sync-warmup-rounds must be >= 0"):
        TrainConfig(sync_compression="cocktail", sync_warmup_rounds=-1)


def test_train_config_travels_as_json():
    cfg = parse(CoordinatorConfig, ["--lr", "0.5", "--seq-len", "32"])
    train = TrainConfig.from_json(cfg.train_config().to_json())
    assert train == cfg.train_config() and train.lr == 0.5 and train.seq_len == 32
    with pytest.raises(ConfigError, match="upgrade hometrain"):
        TrainConfig.from_json('{"lr": 1.0, "future_knob": 3}')


def test_public_host_never_assumes_loopback_when_announced():
    assert CoordinatorConfig(host="0.0.0.0").public_host == "127.0.0.1"
    assert CoordinatorConfig(host="0.0.0.0", announce_host="203.0.113.7").public_host == "203.0.113.7"
    assert CoordinatorConfig(host="10.1.2.3").public_host == "10.1.2.3"
