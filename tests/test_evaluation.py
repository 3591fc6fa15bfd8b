"""`coordinator eval`: perplexity equal to GPT-J's own, accuracy by lm-evaluation-harness's definitions, the checkpoint untouched."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, GPTJForCausalLM

from coordinator.assignment import stage_layer_ranges
from coordinator.checkpoint import load_signing_key, split_state_dict, write_checkpoint
from coordinator.data.corpus import builtin_documents
from coordinator.data.heldout import is_heldout, read_heldout, split_heldout, write_heldout
from coordinator.data.probe import LABEL_TASKS, ChoiceItem, builtin_probe, read_choice_task, subject, trained_subjects
from coordinator.data.tokenizer import train_tokenizer
from coordinator.evaluation import EVAL_FILE, accuracy, evaluate, harness_accuracy, perplexity, token_stream
from coordinator.model_presets import preset_config
from proto.manifest import verify_directory
from proto.run_config import EvalOptions

from .swarm import ENV, ROOT, seeded_model

SHARE = 0.1
CONTEXT = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a coordinator leaves it: checkpoints/round-000004 and heldout/."""
    root = tmp_path_factory.mktemp("eval-run")
    docs = builtin_documents()[:300]
    train, held = split_heldout(docs, SHARE)
    tokenizer = train_tokenizer(train, 400)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    config = preset_config("tiny", len(tokenizer), tokenizer.eos_token_id, 64)
    model = seeded_model(config, seed=3)
    stages = split_state_dict(model.state_dict(), stage_layer_ranges(config.n_layer, 2), config.n_layer)
    write_checkpoint(root / "checkpoints", run_id="run", round=4, tokens=10, loss=3.0, config=config, stage_tensors=stages,
                     tokenizer_dir=root / "tokenizer", signing_key=load_signing_key(root / "key.pem"))
    records = [("Q: what is two plus two?\nA:", " four"), ("Q: spell cat.\nA:", " c-a-t")]
    write_heldout(root / "heldout", SHARE, {"text": held, "qa": records})
    return root


def checkpoint(run_dir):
    return run_dir / "checkpoints" / "round-000004"


def load(run_dir):
    path = checkpoint(run_dir)
    return GPTJForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def reference_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """GPT-J's own loss (labels, -100 masking as in transformers' perplexity guide) over target spans: the first
    window's tokens, then ``stride`` at a time, each read with the ``context`` tokens that end where it ends."""
    nll, counted, first, end = 0.0, 0, 1, min(len(ids), context)
    while True:
        begin = max(0, end - context)
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            nll += float(model(window, labels=labels).loss) * (end - first)
        counted += end - first
        if end == len(ids):
            return math.exp(nll / counted)
        first, end = end, min(len(ids), end + stride)


def test_split_files_round_trip(run_dir):
    split = read_heldout(run_dir / "heldout")
    assert split.share == SHARE and list(split.sources) == ["text", "qa"]
    assert all(is_heldout(d, SHARE) for d in split.sources["text"]) and split.sources["qa"][1] == ("Q: spell cat.\nA:", " c-a-t")


def test_perplexity_equals_gptj_on_the_same_tokens(run_dir):
    model, tokenizer = load(run_dir)
    ids = token_stream(tokenizer, read_heldout(run_dir / "heldout").sources["text"], 400)
    assert len(ids) == 400
    # One window: the model's own mean loss over the stream.
    with torch.no_grad():
        whole = math.exp(float(model(torch.tensor([ids[:64]]), labels=torch.tensor([ids[:64]])).loss))
    assert perplexity(model, ids[:64], 64, 32).perplexity == pytest.approx(whole, rel=1e-5)
    # Sliding windows, several strides.
    for stride in (8, 16, CONTEXT - 1):
        ours = perplexity(model, ids, CONTEXT, stride)
        assert ours.tokens == len(ids) - 1, "every token after the first is predicted once"
        assert ours.perplexity == pytest.approx(reference_perplexity(model, ids, CONTEXT, stride), rel=1e-5)


class CharTokenizer:
    """One id per character (its code point, below 256)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class UnigramModel(torch.nn.Module):
    """Scores every next character by a fixed table, whatever came before: choices' likelihoods are known by hand."""

    def __init__(self, logp: dict[str, float]) -> None:
        super().__init__()
        table = torch.full((256,), -30.0)
        for char, value in logp.items():
            table[ord(char)] = value
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        return type("Out", (), {"logits": self.table.expand(*ids.shape, 256)})()


def test_accuracy_is_the_hand_counted_accuracy():
    # log p: ' ' -10, 'a' -1, 'b' -2, 'c' -3 (each renormalised by log_softmax; the differences are what rank choices).
    model = UnigramModel({" ": -10.0, "a": -1.0, "b": -2.0, "c": -3.0})
    items = [
        ChoiceItem("Q1", ("a", "b"), 0),        # acc: " a" -11 > " b" -12 -> a (right). norm: -11 vs -12 -> a (right)
        ChoiceItem("Q2", ("a", "b"), 1),        # both pick a: wrong, wrong
        ChoiceItem("Q3", ("a", "aab"), 1),      # sums -11 vs -14 -> a (wrong); per char -11 vs -4.67 -> aab (right)
        ChoiceItem("Q4", ("c", "aa"), 1),       # sums -13 vs -12 -> aa (right); per char -13 vs -6 -> aa (right)
        ChoiceItem("Q5", ("cc", "a"), 0, shots=(("S", "b"),)),  # sums -16 vs -11 -> a (wrong); per char -8 vs -11 -> cc (right)
    ]
    result = accuracy(model, CharTokenizer(), items, max_length=64)
    assert (result.acc, result.acc_norm, result.n) == (2 / 5, 4 / 5, 5)


def test_a_long_context_is_cut_from_the_left_as_the_harness_does():
    model = UnigramModel({" ": -10.0, "a": -1.0, "b": -2.0})
    item = ChoiceItem("x" * 500, ("a", "bb"), 0)
    assert accuracy(model, CharTokenizer(), [item], max_length=8).acc == 1.0


def test_the_builtin_scorer_agrees_with_lm_evaluation_harness(run_dir):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the test and eval extras bring it)")
    model, tokenizer = load(run_dir)
    tasks = builtin_probe(SHARE, 40, shots=2)
    tasks["arith"] = [ChoiceItem(f"{a} + {b} =", (str(a + b), str(a + b + 1), str(a - b)), 0, shots=(("1 + 1 =", "2"),))
                      for a, b in [(3, 4), (10, 2), (7, 7), (25, 5), (9, 1), (12, 30)]]
    theirs = harness_accuracy(checkpoint(run_dir), tasks, torch.device("cpu"), 64)
    for task, items in tasks.items():
        ours = accuracy(model, tokenizer, items, 64)
        assert (ours.acc, ours.acc_norm, ours.n) == pytest.approx((theirs[task].acc, theirs[task].acc_norm, theirs[task].n)), task


def test_builtin_probe_questions_are_held_out_and_demonstrations_are_not():
    tasks = builtin_probe(0.05, 30, 3)
    assert set(tasks) == set(LABEL_TASKS)
    for task, items in tasks.items():
        assert items and len({i.prompt for i in items}) == len(items)
        for item in items:
            assert is_heldout((item.prompt, " " + item.choices[item.answer]), 0.05), "a probe question could be trained on"
            assert len(item.shots) == 3 and not any(is_heldout((p, " " + a), 0.05) for p, a in item.shots)
    trained = trained_subjects(0.05)
    assert not any(subject(task, i.prompt) in trained[task] for task, items in tasks.items() for i in items), \
        "a probe question asks about a number or review that training sees under another template"
    assert builtin_probe(0.05, 30, 3) == tasks and builtin_probe(0.0, 30, 3) == {}


def test_choice_task_files_are_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}\n{"prompt": "3+3=", "choices": ["6", "7"], "answer": 0}\n')
    items = read_choice_task(good, shots=1)
    assert items[0].shots == (("3+3=", "6"),) and items[1].shots == (("2+2=", "4"),)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2=", "choices": ["4"], "answer": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        read_choice_task(bad, shots=0)


def test_coordinator_eval_writes_eval_json_and_leaves_the_checkpoint_alone(run_dir, tmp_path):
    task = tmp_path / "arith.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
                            for a in range(6)))
    path = checkpoint(run_dir)
    manifest_before = (path / "manifest.json").read_bytes()
    out = subprocess.run([sys.executable, "-m", "coordinator", "eval", str(path), "--json", "--context", str(CONTEXT),
                          "--tasks", f"arith={task}", "--probe-items", "10"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert json.loads((path / EVAL_FILE).read_text()) == printed
    assert printed["round"] == 4 and set(printed["perplexity"]) == {"text", "qa"}
    assert set(printed["accuracy"]) == {"parity", "sentiment", "arith"} and printed["details"]["accuracy"]["arith"]["n"] == 6
    assert all(math.isfinite(v) and v > 1 for v in printed["perplexity"].values())
    assert (path / "manifest.json").read_bytes() == manifest_before
    verify_directory(path)  # every hashed file unchanged; eval.json is not in the manifest
    model, tokenizer = load(run_dir)
    ids = token_stream(tokenizer, read_heldout(run_dir / "heldout").sources["text"], 20_000)
    assert printed["perplexity"]["text"] == pytest.approx(perplexity(model, ids, CONTEXT, CONTEXT // 2).perplexity, rel=1e-5)


def test_a_tampered_checkpoint_is_refused_and_the_file_named(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "checkpoints" / "round-000004"
    shutil.copytree(checkpoint(run_dir), copy, ignore=shutil.ignore_patterns(EVAL_FILE))
    shard = copy / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="model-00001-of-00002.safetensors"):
        evaluate(copy, EvalOptions(heldout=str(run_dir / "heldout"), context=CONTEXT))
    assert not (copy / EVAL_FILE).exists()


def test_without_a_split_it_says_where_to_point(run_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "coordinator", "eval", str(checkpoint(run_dir)), "--heldout", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert out.returncode == 2 and "--heldout DIR" in out.stderr and "split.json" in out.stderr
