"""`coordinator eval`: a published checkpoint judged on held-out perplexity per source and multiple-choice accuracy.

The checkpoint is loaded as a user would load it: verified against its manifest, then
``GPTJForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` from the directory,
offline (a LoRA checkpoint: its adapters merged onto their base, as ``coordinator export
--merge`` does). The held-out split is the one the coordinator carved and saved in
``STATE_DIR/heldout`` (``data.heldout.write_heldout``).

- **Perplexity** of each source: its held-out items (documents; prompt + completion records)
  tokenized with the checkpoint's tokenizer, joined by EOS into one stream (its first
  ``max_tokens``), scored causally in windows of ``context`` tokens moved by ``stride`` (below
  ``context``): every token after the first is predicted exactly once, the first window's with
  the tokens before them, each later window's with the ``context - stride`` tokens before the
  ``stride`` it scores. ``exp`` of the mean negative log-likelihood over the tokens predicted.
- **Accuracy** on multiple-choice tasks (``data.probe``), by log-likelihood ranking of the
  choices, with lm-evaluation-harness's definitions: the context is the demonstrations, each
  ``prompt + " " + answer``, joined and followed by the prompt with ``"\\n\\n"``; a choice is the
  continuation ``" " + choice``; ``acc`` takes the choice of highest summed log-likelihood,
  ``acc_norm`` the highest per character of the choice. Contexts too long are cut from the left.

``--engine harness`` has lm-evaluation-harness itself score the same questions (written as
local tasks; it runs offline). It is an extra (``pip install -e ".[eval]"``), not a dependency:
it brings 47 more packages (datasets, pandas, pyarrow, scikit-learn, nltk, sacrebleu, aiohttp
among them) to every install. The built-in scorer is the default, and the tests check that the
two agree on every question set they score.

Results go to ``eval.json`` beside the checkpoint's files; the hashed files and the manifest
never change (the manifest does not list ``eval.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from proto.manifest import ADAPTER_FILE, ManifestError, verify_directory
from proto.run_config import ConfigError, EvalOptions, parse_eval_task

from .data.heldout import HeldoutSplit, read_heldout
from .data.probe import TARGET_DELIMITER, ChoiceItem, builtin_probe, read_choice_task

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
TOKEN_BUDGET = 8192  # tokens per forward (GPT-J-6B: its fp32 logits, 1.6 GB, are the largest thing a batch makes)
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int      # tokens predicted
    context: int
    stride: int


@dataclass
class AccuracyResult:
    acc: float
    acc_norm: float
    n: int           # questions
    shots: int


@dataclass
class EvalResult:
    round: int | None
    started: float = 0.0  # wall-clock time the evaluation began
    perplexity: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"acc", "acc_norm"}
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # the settings and counts behind each figure

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint_model(checkpoint: Path, device: torch.device, base: Path | None = None):
    """(model, tokenizer) from a verified checkpoint directory, offline; fp32 on CPU, bf16 on a GPU."""
    from transformers import AutoTokenizer, GPTJForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not checkpoint.is_dir():
        raise ConfigError(f"{checkpoint} is not a directory; point it at a checkpoint (e.g. STATE_DIR/checkpoints/round-000030)")
    try:
        verify_directory(checkpoint, model_only=True)  # a volunteer's copy leaves the optimizer state out
    except ManifestError as exc:
        raise ConfigError(f"{checkpoint} is not a complete, intact checkpoint, so it is not evaluated: {exc}") from None
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if (checkpoint / ADAPTER_FILE).is_file():
        from .export import load_merged

        model = load_merged(checkpoint, base).to(dtype)
    else:
        model = GPTJForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return model.to(device).eval(), tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_stream(tokenizer, items: Sequence[str | tuple[str, str]], max_tokens: int) -> list[int]:
    """A source's held-out items as one token stream, each followed by EOS, cut at ``max_tokens``."""
    ids: list[int] = []
    for item in items:
        text = item if isinstance(item, str) else item[0] + item[1]
        # As the mixer tokenizes for training: special-token strings inside the data stay plain text.
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


@torch.no_grad()
def token_logprobs(model, windows: Sequence[Sequence[int]], token_budget: int = TOKEN_BUDGET) -> list[torch.Tensor]:
    """Per window, log p(window[j + 1] | window[: j + 1]) for every j, in fp32; the model reads all but the last
    token of each window. Windows are batched up to ``token_budget`` tokens, right-padded (a causal model's logits
    at a position never depend on what follows it, so padding changes nothing), and normalised one row at a time,
    so the fp32 vocabulary-wide copies stay at one row's (GPT-J-6B: 2,048 x 50,400 x 4 bytes, 0.4 GB)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    first = 0
    while first < len(windows):
        width = len(windows[first])
        last = first + 1
        while last < len(windows) and max(width, len(windows[last])) * (last - first + 1) <= token_budget:
            width = max(width, len(windows[last]))
            last += 1
        batch = windows[first:last]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, window in enumerate(batch):
            ids[row, :len(window)] = torch.tensor(list(window), dtype=torch.long)
        ids = ids.to(device)
        logits = model(ids[:, :-1]).logits
        for row, window in enumerate(batch):
            n = len(window) - 1
            logprobs = torch.log_softmax(logits[row, :n].float(), dim=-1)
            out.append(logprobs.gather(1, ids[row, 1:n + 1, None])[:, 0].cpu())
        del logits
        first = last
    return out


@torch.no_grad()
def perplexity(model, ids: Sequence[int], context: int, stride: int) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (see the module docstring): the first window scores its ``context - 1``
    predictions, each later one the next ``stride`` tokens, after the ``context - stride`` tokens before them."""
    if not 0 < stride < context:
        raise ValueError(f"the stride must be in 1..{context - 1} (below the context, so every window has context), got {stride}")
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    spans = []  # (begin, end, first predicted): ids[:first] are predicted by earlier windows (the first token never is)
    scored = 1
    while scored < len(ids):
        end = min(len(ids), context if scored == 1 else scored + stride)
        spans.append((max(0, end - context), end, scored))
        scored = end
    total, counted = 0.0, 0
    for (begin, _, first), logprobs in zip(spans, token_logprobs(model, [ids[b:e] for b, e, _ in spans])):
        new = logprobs[first - begin - 1:]  # logprobs[j] predicts ids[begin + j + 1]
        total -= float(new.double().sum())
        counted += new.numel()
    mean = total / counted
    if math.isnan(mean):
        raise ValueError("the model's log-likelihoods are NaN: its weights hold NaN or Inf")
    return PerplexityResult(math.exp(mean) if mean < 709 else math.inf, counted, context, stride)  # a diverged model: inf


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing spaces of the context move to
    the continuation, and the continuation's ids are those of the whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return head, whole[len(head):]


def question_context(item: ChoiceItem) -> str:
    shots = [prompt + TARGET_DELIMITER + answer for prompt, answer in item.shots]
    return FEWSHOT_DELIMITER.join(shots + [item.prompt])


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, items: Sequence[ChoiceItem], max_length: int) -> list[list[float]]:
    """Per item, the summed log-likelihood of each choice as the continuation of the item's context."""
    windows, tails = [], []
    for item in items:
        for choice in item.choices:
            head, tail = _encode_pair(tokenizer, question_context(item), TARGET_DELIMITER + choice)
            windows.append((head + tail)[-(max_length + 1):])  # the model reads at most max_length of them
            tails.append(len(tail))
    scores = iter(float(lp[-n:].double().sum()) for lp, n in zip(token_logprobs(model, windows), tails))
    return [[next(scores) for _ in item.choices] for item in items]


def accuracy(model, tokenizer, items: Sequence[ChoiceItem], max_length: int) -> AccuracyResult:
    """``acc`` and ``acc_norm`` over ``items`` (see the module docstring)."""
    right = right_norm = 0
    for item, lls in zip(items, choice_loglikelihoods(model, tokenizer, items, max_length)):
        per_char = [ll / len(c) for ll, c in zip(lls, item.choices)]
        right += max(range(len(lls)), key=lls.__getitem__) == item.answer
        right_norm += max(range(len(per_char)), key=per_char.__getitem__) == item.answer
    n = len(items)
    return AccuracyResult(right / n, right_norm / n, n, max((len(i.shots) for i in items), default=0))


def harness_accuracy(checkpoint: Path, tasks: dict[str, list[ChoiceItem]], device: torch.device,
                     max_length: int) -> dict[str, AccuracyResult]:
    """The same questions scored by lm-evaluation-harness itself: written as local JSONL tasks (each prompt with
    its demonstrations already in front, so both scorers read the same contexts) and run offline through
    ``lm_eval.simple_evaluate`` with its ``hf`` model loading ``checkpoint``, zero-shot."""
    if (checkpoint / ADAPTER_FILE).is_file():
        raise ConfigError(f"{checkpoint} holds LoRA adapters; the harness loads plain models: `coordinator export --merge` it first, "
                          "or use --engine builtin")
    with tempfile.TemporaryDirectory(prefix="hometrain-eval-") as tmp:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "cache"))  # read where datasets is first imported
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError('--engine harness needs lm-evaluation-harness: pip install -c requirements.lock -e ".[eval]"') from None
        names = {}
        for name, items in tasks.items():
            data = Path(tmp) / f"{name}.jsonl"
            data.write_text("".join(json.dumps({"prompt": question_context(i), "choices": list(i.choices), "answer": i.answer}) + "\n"
                                    for i in items))
            names[name] = f"hometrain_{name}"
            (Path(tmp) / f"{name}.yaml").write_text(HARNESS_TASK.format(name=names[name], path=data))
        dtype = "float32" if device.type == "cpu" else "bfloat16"
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={checkpoint},dtype={dtype},max_length={max_length}", tasks=list(names.values()),
            num_fewshot=0, device=str(device), batch_size=max(1, TOKEN_BUDGET // max_length), task_manager=TaskManager(include_path=tmp))["results"]
    return {name: AccuracyResult(results[names[name]]["acc,none"], results[names[name]]["acc_norm,none"], len(items),
                                 max((len(i.shots) for i in items), default=0))
            for name, items in tasks.items()}


HARNESS_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _tasks(config: EvalOptions, split: HeldoutSplit) -> dict[str, list[ChoiceItem]]:
    tasks = builtin_probe(split.share, config.probe_items, config.shots, config.seed)
    for spec in config.tasks:
        name, path = parse_eval_task(spec)
        try:
            tasks[name] = read_choice_task(path, config.shots, config.seed)
        except ValueError as exc:
            raise ConfigError(f"evaluation task {name}: {exc}") from None
    return tasks


def evaluate(checkpoint: Path, config: EvalOptions) -> EvalResult:
    """Every figure of the module docstring for ``checkpoint``; also written to its ``eval.json``."""
    started, wall = time.monotonic(), time.time()
    heldout_dir = config.heldout_dir(checkpoint)
    try:
        split = read_heldout(heldout_dir)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"no held-out split to evaluate on ({exc}); pass --heldout DIR, a run's STATE_DIR/heldout") from None
    tasks = _tasks(config, split)
    device = pick_device(config.device)
    model, tokenizer = load_checkpoint_model(checkpoint, device, Path(config.base) if config.base else None)
    context = config.context or model.config.n_positions
    if context > model.config.n_positions:
        raise ConfigError(f"--context {context} exceeds the model's {model.config.n_positions} positions")
    stride = config.stride or max(1, context // 2)
    if stride >= context:
        raise ConfigError(f"--stride {stride} must be below the context, {context} tokens")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    result = EvalResult(round=manifest.get("round"), started=wall)
    for source, items in split.sources.items():
        ids = token_stream(tokenizer, items, config.max_tokens)
        if len(ids) < 2:
            log.warning("source %s: its held-out split has no text to score; skipped", source)
            continue
        try:
            ppl = perplexity(model, ids, context, stride)
        except ValueError as exc:
            raise ConfigError(f"source {source}: {exc}") from None
        result.perplexity[source] = ppl.perplexity
        result.details.setdefault("perplexity", {})[source] = asdict(ppl)
    for task in [t for t, items in tasks.items() if not items]:
        log.warning("task %s has no questions; skipped", task)
        del tasks[task]
    if config.engine == "harness":
        del model  # the harness loads its own copy: never two GPT-J-6B at once
        if device.type == "cuda":
            torch.cuda.empty_cache()
        scored = harness_accuracy(checkpoint, tasks, device, context)
    else:
        scored = {task: accuracy(model, tokenizer, items, context) for task, items in tasks.items()}
    for task, acc in scored.items():
        result.accuracy[task] = {"acc": acc.acc, "acc_norm": acc.acc_norm}
        result.details.setdefault("accuracy", {})[task] = asdict(acc) | {"engine": config.engine}
    result.details["device"] = str(device)
    result.seconds = time.monotonic() - started
    save(checkpoint, result)
    return result


def save(checkpoint: Path, result: EvalResult | dict[str, Any]) -> Path:
    """``eval.json`` in the checkpoint directory, written atomically (the manifest does not list it)."""
    path = checkpoint / EVAL_FILE
    tmp = checkpoint / f".{EVAL_FILE}.tmp"
    tmp.write_text(json.dumps(result.to_json() if isinstance(result, EvalResult) else result, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load_saved(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's ``eval.json``, or None if it has not been evaluated (or the file is unreadable)."""
    try:
        return json.loads((checkpoint / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
