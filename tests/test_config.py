"""Configs: one dataclass per process is the source of flags, TOML keys and defaults."""

from __future__ import annotations

import argparse
import dataclasses

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


def test_secrets_come_from_a_file_or_the_environment_never_the_command_line(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, PeerConfig)
    assert load(PeerConfig, parser.parse_args(["--join-token-file", str(secret)]), environ={}).join_token == "from-file"
    assert load(PeerConfig, parser.parse_args([]), environ={"HOMETRAIN_JOIN_TOKEN": "from-env"}).join_token == "from-env"
    assert load(PeerConfig, parser.parse_args(["--join-token-file", str(secret)]), environ={"HOMETRAIN_JOIN_TOKEN": "e"}).join_token == "from-file"
    toml = tmp_path / "peer.toml"
    toml.write_text('join-token = "from-toml"\n')
    assert load(PeerConfig, parser.parse_args([]), str(toml), environ={}).join_token == "from-toml"
    with pytest.raises(SystemExit):
        parser.parse_args(["--join-token", "visible-in-ps"])
    with pytest.raises(ConfigError, match="--join-token-file .*cannot read it"):
        load(PeerConfig, parser.parse_args(["--join-token-file", str(tmp_path / "missing")]), environ={})


def test_toml_values_are_checked_against_their_types(tmp_path):
    toml = tmp_path / "run.toml"
    for text, message in (('stages = "two"', "should be a whole number"), ("lr = true", "should be a number"),
                          ("linger = 1", "should be true or false"), ('model = "gptj-7b"', "should be one of 'tiny'"),
                          ("stages = \n", "is not valid TOML")):
        toml.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            parse(CoordinatorConfig, [], str(toml))
    toml.write_text("lr = 1\n")  # an integer is a fine float
    assert parse(CoordinatorConfig, [], str(toml)).lr == 1.0


def test_initial_peers_is_a_list_on_the_command_line_and_in_toml(tmp_path):
    cfg = parse(PeerConfig, ["--initial-peers", "/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/1/p2p/B"])
    assert cfg.initial_peers == ("/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/1/p2p/B")
    toml = tmp_path / "peer.toml"
    toml.write_text('initial-peers = "/ip4/10.0.0.1/tcp/1/p2p/A /ip4/10.0.0.2/tcp/1/p2p/B"\n')  # as older files wrote it
    assert parse(PeerConfig, [], str(toml)).initial_peers == cfg.initial_peers
    toml.write_text('initial-peers = ["/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/1/p2p/B"]\n')
    assert parse(PeerConfig, [], str(toml)).initial_peers == cfg.initial_peers


def test_coordinator_address_and_ports_are_checked():
    assert PeerConfig(coordinator="coord.example.org:50051").coordinator_host == "coord.example.org"
    assert PeerConfig(coordinator="[2001:db8::1]:50051").coordinator_host == "2001:db8::1"
    for bad, message in (("coord:abc", "'abc' is not a number"), ("coord:0", "from 1 to 65535"), (":50051", "HOST:PORT")):
        with pytest.raises(ConfigError, match=message):
            PeerConfig(coordinator=bad)
    with pytest.raises(ConfigError, match="--http-port must be a TCP port"):
        CoordinatorConfig(http_port=65536)


def test_every_setting_is_in_exactly_one_section():
    from coordinator.demo import DemoConfig

    for cls in (TrainConfig, CoordinatorConfig, PeerConfig, DemoConfig):
        names = [n for section in cls.sections.values() for n in section]
        assert sorted(names) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__


def test_help_groups_flags_by_section_and_shows_each_default_once_with_its_unit():
    parser = argparse.ArgumentParser()
    add_arguments(parser, CoordinatorConfig)
    text = parser.format_help()
    for section in ("run:", "model:", "data:", "optimizer:", "compression:", "network:", "observability:"):
        assert f"\n{section}\n" in text, section
    assert "(default: 120 s)" in text and "(default: 64 tokens)" in text and text.count("(default: 50051)") == 1
    assert "--model {tiny,small,gptj-6b}" in text and "--sync-bits {2,4,8}" in text


def test_a_sectioned_toml_file_loads_like_a_flat_one(tmp_path):
    flat, sectioned = tmp_path / "flat.toml", tmp_path / "sections.toml"
    flat.write_text('stages = 3\nport = 6000\nlr = 0.01\nsync-bits = 2\n[[sources]]\nname = "t"\npath = "builtin:text"\n')
    sectioned.write_text('[model]\nstages = 3\n[network]\nport = 6000\n[optimizer]\nlr = 0.01\n[compression]\nsync-bits = 2\n'
                         '[[sources]]\nname = "t"\npath = "builtin:text"\n')
    assert parse(CoordinatorConfig, [], str(flat)) == parse(CoordinatorConfig, [], str(sectioned))
    sectioned.write_text("[model]\nport = 6000\n")
    with pytest.raises(ConfigError, match=r"\[model\] of .*unknown setting 'port'; known: .*stages"):
        parse(CoordinatorConfig, [], str(sectioned))
    sectioned.write_text("port = 1\n[network]\nport = 6000\n")
    with pytest.raises(ConfigError, match="set twice"):
        parse(CoordinatorConfig, [], str(sectioned))


def test_choices_are_typed_and_enforced():
    with pytest.raises(SystemExit):
        parse(CoordinatorConfig, ["--sync-bits", "3"])
    assert parse(CoordinatorConfig, ["--sync-bits", "2"]).sync_bits == 2
