"""The run's data from its config: flags and [[sources]], the schedule, the tokenizer's special tokens,
the engine's token accounting (persisted) and the status page's Data section."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import GPTJConfig, GPTJForCausalLM

from coordinator.app import CoordinatorApp
from coordinator.data.corpus import builtin_documents
from coordinator.data.build import build_mixer, schedule, source_configs, tokenizer_documents, tokenizer_special_tokens
from coordinator.membership import Membership
from coordinator.data.batch import MicrobatchInfo
from coordinator.rounds import RoundEngine
from coordinator.status_page import data_section, render_page
from coordinator.store import RoundRecord, Store
from coordinator.data.tokenizer import END_OF_TEXT, load_or_train, load_pretrained, train_tokenizer
from coordinator.data.ul2 import UL2Vocab, special_tokens
from proto.run_config import ConfigError, CoordinatorConfig, add_arguments, load


def parse(argv, toml=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser, CoordinatorConfig)
    return load(CoordinatorConfig, parser.parse_args(argv), toml)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(builtin_documents()[:200], 500, special_tokens())


# ------------------------------------------------------------------ config


def test_data_flags_and_their_errors():
    cfg = parse(["--ul2-tokens", "0", "--instruction-share", "0.2", "--ul2-shares", "1,0,1", "--pack-instructions"])
    assert (cfg.ul2_tokens, cfg.instruction_share, cfg.ul2_share_values, cfg.pack_instructions) == (0, 0.2, (1.0, 0.0, 1.0), True)
    with pytest.raises(ConfigError, match="--ul2-tokens"):
        parse(["--ul2-tokens", "-1"])
    with pytest.raises(ConfigError, match="--instruction-share"):
        parse(["--instruction-share", "1.5"])
    for bad in ("0.5,0.5", "a,b,c", "0,0,0", "1,-1,1", "nan,1,1"):
        with pytest.raises(ConfigError, match="--ul2-shares"):
            parse(["--ul2-shares", bad])
    with pytest.raises(SystemExit):  # a list of tables has no flag: TOML only
        parse(["--sources", "x"])


def test_sources_come_from_toml_tables(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('ul2-tokens = 100\n[[sources]]\nname = "pile"\npath = "data/pile"\nweight = 55\n'
                    '[[sources]]\nname = "ni"\npath = "data/ni.jsonl"\nformat = "prompt_completion"\nweight = 20\nmax_records = 7\n')
    cfg = parse([], str(toml))
    assert cfg.sources == ({"name": "pile", "path": "data/pile", "weight": 55}, {"name": "ni", "path": "data/ni.jsonl",
                           "format": "prompt_completion", "weight": 20, "max_records": 7})
    assert [s.name for s in source_configs(cfg)] == ["pile", "ni"] and source_configs(cfg)[1].max_records == 7
    for body, message in (('[[sources]]\nname = "a"\nwieght = 1\n', "unknown key.*wieght"),
                          ('[[sources]]\npath = "x"\n', "needs a name"),
                          ('[[sources]]\nname = "a"\nformat = "csv"\n', "format must be one of"),
                          ('[[sources]]\nname = "a"\nweight = -1\n', "weight must be"),
                          ('[[sources]]\nname = "a"\nweight = "big"\n', "wrong type"),
                          ('[[sources]]\nname = "a"\n[[sources]]\nname = "a"\n', "unique")):
        toml.write_text(body)
        with pytest.raises(ConfigError, match=message):
            parse([], str(toml))


# ------------------------------------------------------------------ schedule and mixer


def test_default_schedule_is_ul2_on_text_then_causal_mix():
    cfg = CoordinatorConfig()
    ul2, causal = schedule(cfg, source_configs(cfg))
    assert (ul2.objective, ul2.until_tokens, dict(ul2.weights)) == ("ul2", cfg.ul2_tokens, {"text": 0.55})
    assert causal.objective == "causal" and causal.weights == pytest.approx({"text": 0.55, "instructions": 0.45})


def test_schedule_variants():
    only_causal = schedule(CoordinatorConfig(ul2_tokens=0, instruction_share=0), source_configs(CoordinatorConfig()))
    assert [(p.objective, dict(p.weights)) for p in only_causal] == [("causal", {"text": 1.0})]
    sources = source_configs(CoordinatorConfig(sources=({"name": "a", "weight": 3}, {"name": "b", "weight": 1},
                                                        {"name": "q", "format": "prompt_completion", "weight": 2},
                                                        {"name": "off", "weight": 0})))
    ul2, causal = schedule(CoordinatorConfig(instruction_share=0.2), sources)
    assert dict(ul2.weights) == {"a": 3, "b": 1}
    assert causal.weights == pytest.approx({"a": 0.6, "b": 0.2, "q": 0.2})
    instructions_only = source_configs(CoordinatorConfig(sources=({"name": "q", "format": "prompt_completion"},)))
    with pytest.raises(ConfigError, match="--ul2-tokens 0"):
        schedule(CoordinatorConfig(), instructions_only)
    assert dict(schedule(CoordinatorConfig(ul2_tokens=0), instructions_only)[0].weights) == {"q": 1.0}


def test_build_mixer_reads_toml_sources_and_skips_unused_ones(tmp_path, tokenizer):
    (tmp_path / "notes.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({"prompt": f"Q{i}: two plus {i}?", "completion": f" {2 + i}"}) for i in range(50)))
    cfg = CoordinatorConfig(ul2_tokens=300, seq_len=32, sources=(
        {"name": "notes", "path": str(tmp_path / "notes.txt")},
        {"name": "qa", "path": str(tmp_path / "qa.jsonl"), "format": "prompt_completion"},
        {"name": "unused", "path": str(tmp_path / "missing.txt"), "weight": 0},
    ))
    mixer = build_mixer(cfg, tokenizer)
    assert [s.name for s in mixer.sources] == ["notes", "qa"]
    assert "two plus" in "".join(tokenizer_documents(cfg))
    _, info = mixer.microbatch_with_info(1, 0, 4, 0)
    assert info.phase_objective == "ul2" and set(info.sources) == {"notes"}
    _, info = mixer.microbatch_with_info(1, 0, 8, 300)
    assert info.phase_objective == "causal"
    broken = CoordinatorConfig(sources=({"name": "gone", "path": str(tmp_path / "missing.txt")},))
    with pytest.raises(ConfigError, match=r"\[\[sources\]\].*missing.txt does not exist"):
        build_mixer(broken, tokenizer)


# ------------------------------------------------------------------ tokenizer


def test_trained_tokenizer_holds_the_ul2_tokens_inside_vocab_size(tmp_path):
    specials = tokenizer_special_tokens(CoordinatorConfig())
    tok = load_or_train(tmp_path / "tok", builtin_documents(), 600, specials)
    assert len(tok) == 600 and tok.convert_tokens_to_ids(END_OF_TEXT) == tok.eos_token_id == 0
    ids = tok.convert_tokens_to_ids(specials)
    assert ids == list(range(1, len(specials) + 1))
    assert tok("a <extra_id_7> b", add_special_tokens=False)["input_ids"].count(tok.convert_tokens_to_ids("<extra_id_7>")) == 1
    again = load_or_train(tmp_path / "tok", iter(()), 600, specials)  # a restart: loaded, same ids
    assert again.convert_tokens_to_ids(specials) == ids and len(again) == 600
    UL2Vocab.from_tokenizer(again)
    with pytest.raises(ValueError, match=">= "):
        train_tokenizer(builtin_documents(), 350, specials)


def test_a_saved_tokenizer_without_the_ul2_tokens_gets_them_appended(tmp_path):
    plain = train_tokenizer(builtin_documents()[:100], 400)
    plain.save_pretrained(str(tmp_path / "plain"))
    tok = load_pretrained(tmp_path / "plain", special_tokens())
    assert len(tok) == 400 + len(special_tokens()) and tok.convert_tokens_to_ids("[NLU]") == 400
    run = load_or_train(tmp_path / "run", iter(()), 0, special_tokens(), pretrained=tmp_path / "plain")
    assert len(run) == len(tok) and (tmp_path / "run" / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_pretrained(tmp_path / "nowhere", special_tokens())


def test_init_from_with_a_too_small_embedding_names_the_flags(tmp_path):
    plain = train_tokenizer(builtin_documents()[:100], 400)
    plain.save_pretrained(str(tmp_path / "tok"))
    config = GPTJConfig(vocab_size=450, n_positions=128, n_embd=32, n_layer=2, n_head=2, rotary_dim=8)
    GPTJForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    app = CoordinatorApp(CoordinatorConfig(state_dir=str(tmp_path / "run"), init_from=str(tmp_path / "model"),
                                           tokenizer=str(tmp_path / "tok"), stages=1))
    with pytest.raises(ConfigError, match=r"503 entries.*--init-from.*450 rows.*--tokenizer"):
        app._prepare_run()
    app.store.close()


# ------------------------------------------------------------------ accounting and status


def info(phase, sources, objectives, loss_tokens, round=1, index=0):
    return MicrobatchInfo(round, index, phase, ["ul2", "causal"][phase], sources, objectives, [64] * len(sources), loss_tokens)


def test_engine_counts_loss_tokens_by_phase_source_objective_and_keeps_them(tmp_path, tokenizer):
    cfg = CoordinatorConfig(ul2_tokens=100, sources=({"name": "text", "path": "builtin:text"},))
    mixer = build_mixer(cfg, tokenizer)
    store = Store(tmp_path / "db.sqlite")
    engine = RoundEngine(cfg, store, mixer, Membership(1, 10), lambda *a: None, [(0, 4)])
    assert engine.data_progress() == {"phase": 0, "objective": "ul2", "tokens_per_phase": [0, 0], "tokens_per_source": {},
                                      "tokens_per_objective": {}, "tokens_per_source_objective": {}, "objective_shares": {}}
    engine.accounting.count(info(0, ["text", "text"], ["S", "R(3,0.15)"], [30, 10]))
    engine.accounting.count(info(1, ["text"], ["causal"], [60]))
    store.record_round(RoundRecord(1, 2.0, 100, 3, 0, 0.0, 1.0, []))
    for callback in engine.on_round_recorded:
        callback(store.rounds()[-1])
    progress = engine.data_progress()
    assert progress["phase"] == 1 and progress["objective"] == "causal"  # 100 tokens trained: --ul2-tokens reached
    assert progress["tokens_per_phase"] == [40, 60] and progress["tokens_per_source"] == {"text": 100}
    assert progress["objective_shares"] == {"R(3,0.15)": 0.1, "S": 0.3, "causal": 0.6}
    restarted = RoundEngine(cfg, store, mixer, Membership(1, 10), lambda *a: None, [(0, 4)])
    assert restarted.data_progress() == progress
    store.close()


def status_data():
    return {
        "phase": {"index": 1, "objective": "causal"},
        "phases": [{"objective": "ul2", "from_tokens": 0, "until_tokens": 4000, "weights": {"text": 1.0, "instructions": 0.0}, "tokens": 4100},
                   {"objective": "causal", "from_tokens": 4000, "until_tokens": None, "weights": {"text": 0.55, "instructions": 0.45}, "tokens": 900}],
        "tokens_per_source": {"text": 4600, "instructions": 400},
        "tokens_per_objective": {"S": 2000, "R(3,0.15)": 1000, "X(64,0.5)": 1100, "causal": 500, "instruction": 400},
        "objective_shares": {"S": 0.4, "R(3,0.15)": 0.2, "X(64,0.5)": 0.22, "causal": 0.1, "instruction": 0.08},
        "sources": [{"name": "text", "path": "builtin:text", "format": "text", "weight": 0.55},
                    {"name": "<b>inst</b>", "path": "builtin:instructions", "format": "prompt_completion", "weight": 0.45}],
    }


def test_status_page_data_section():
    html = data_section(status_data())
    assert "phase 1</b> of 2" in html and "<b>causal</b>" in html
    assert 'id="data-phases"' in html and 'id="data-mix"' in html
    assert "4,100" in html and "text 55.0%" in html and "instructions 45.0%" in html and "instructions 0.0%" not in html
    assert "X(64,0.5)" in html and "22.0%" in html and "&lt;b&gt;inst&lt;/b&gt;" in html
    assert "<h2>Data</h2>" in render_page({"data": status_data()}, [])


def test_status_page_data_section_survives_missing_fields():
    assert "no data information" in data_section(None)
    for data in ({"phase": None}, {"phase": {"index": "x"}, "phases": [None, {"weights": None}], "sources": ["x", {}]},
                 {"tokens_per_source": None, "objective_shares": {"S": None}, "tokens_per_objective": "odd"}):
        assert "<table" in data_section(data) or "no data" in data_section(data)
        render_page({"data": data}, [])
