"""How much device memory a stage needs, by part: a pure function of the model's shape and the run's settings.

The coordinator plans layer ranges with it so every stage fits the memory an organiser names
(``--stage-memory-gb``), and a peer refuses a stage that would not fit its device, saying what
would. Nothing here measures: ``bench/stage_memory.py`` sets each plan beside the peak it
measures on real GPT-J-6B blocks.

What a stage holds (P: its parameters; T: those it trains, P without LoRA):

- ``weights``: P in fp32 (the master copy under bf16/fp16 too). LoRA: the frozen base at
  ``--lora-base-bits`` (32: fp32, 8: int8 + a scale per row, 4: NF4, half a byte + a scale per
  64) and the adapters in fp32.
- ``gradients``: T in fp32, accumulated over the round's microbatches.
- ``optimizer``: AdamW's two fp32 moments (8 bytes per trained parameter), or 8-bit AdamW's two
  uint8 moments with a fp32 scale per 2048 values (tensors under 4096 values stay 32-bit).
- ``anchor``: cocktail keeps the agreed weights (4 bytes per trained parameter); sparseloco
  keeps them and its error-feedback accumulator (8 bytes).
- ``sync``: a sync holds two flat fp32 copies of T while it runs (gradients or deltas, and
  their sum).
- ``step``: the optimizer's own temporaries, one tensor at a time (AdamW is fused, so no
  temporaries the size of the stage): an allowance of one fp32 copy of the largest tensor for
  AdamW, three for 8-bit AdamW (it works on dequantized fp32 moments). The step takes its
  gradients as views of the summed vector, so it holds no copy of its own.
- ``activations``: what autograd keeps of each microbatch between its forward and backward,
  times the microbatches in flight, from the tensors transformers' GPT-J block saves (counted
  with ``torch.autograd.graph.saved_tensors_hooks``; see ``_block_saved``). Autocast keeps a
  16-bit copy of every matrix it multiplies for each microbatch (2 bytes per matrix
  parameter). Activation checkpointing keeps only each block's input, and recomputes one
  block at a time in the backward.
- ``backward``: the largest transient of a backward: the gradients of the MLP's widest
  activations, or of the attention probabilities once the MLP's saved tensors are freed. An
  int8 or NF4 LoRA base adds one dequantised copy of its largest matrix (bitsandbytes
  dequantises a weight for each product, forward and backward: NF4 to fp32, int8 to 16 bits,
  as measured on the CPU).
- ``aqsgd_cache``: the budget the AQ-SGD caches may hold in memory (``--activation-cache-mb``).

Peak = weights + gradients + optimizer + anchor + aqsgd_cache + the larger of
(activations + backward) and (sync + step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP32, HALF = 4, 2
ADAMW_8BIT_MIN = 4096     # bitsandbytes keeps 32-bit state for tensors smaller than this
ADAMW_8BIT_BLOCK = 2048   # values per fp32 absmax in its 8-bit state
GIB = 1 << 30


@dataclass(frozen=True)
class StageShape:
    """The part of GPT-J a stage holds."""

    d_model: int
    n_head: int
    d_ff: int
    rotary_dim: int
    vocab: int
    blocks: int
    embedding: bool   # stage 0: the token embedding
    head: bool        # the last stage: ln_f and lm_head

    @classmethod
    def of(cls, config, layer_start: int, layer_end: int) -> StageShape:
        """From a ``GPTJConfig`` and a layer range."""
        return cls(config.n_embd, config.n_head, config.n_inner or 4 * config.n_embd, config.rotary_dim or config.n_embd // config.n_head,
                   config.vocab_size, layer_end - layer_start, layer_start == 0, layer_end == config.n_layer)

    @property
    def block_matrices(self) -> int:
        """Parameters of one block's linear layers (q, k, v, out; fc_in, fc_out)."""
        return 4 * self.d_model**2 + 2 * self.d_model * self.d_ff

    @property
    def block_parameters(self) -> int:
        return self.block_matrices + self.d_ff + self.d_model + 2 * self.d_model  # fc biases, ln_1

    @property
    def parameters(self) -> int:
        d, v = self.d_model, self.vocab
        return self.blocks * self.block_parameters + (v * d if self.embedding else 0) + (2 * d + d * v + v if self.head else 0)


@dataclass(frozen=True)
class PlanSettings:
    """The run's settings a stage's memory depends on."""

    seq_len: int
    micro_batch: int
    in_flight: int = 1                  # microbatches between their forward and backward at once
    precision: str = "float32"          # float32, bfloat16 or float16 (autocast over fp32 master weights)
    optimizer: str = "adamw"            # adamw or adamw8bit
    activation_checkpointing: bool = False
    lora_rank: int = 0                  # 0: every parameter trains
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_base_bits: int = 32            # the frozen base's storage under LoRA: 32, 8 or 4
    sync_copies: int = 0                # fp32 copies of the trained weights the sync keeps: cocktail 1, sparseloco 2
    aqsgd_cache_bytes: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by part, and the peak they add up to."""

    parts: dict[str, int] = field(default_factory=dict)
    peak: int = 0

    def describe(self) -> str:
        shown = ", ".join(f"{name} {n / GIB:.2f}" for name, n in self.parts.items() if n)
        return f"{self.peak / GIB:.2f} GiB ({shown} GiB)"


def lora_parameters(shape: StageShape, settings: PlanSettings) -> int:
    """Adapter parameters of a stage: rank x (in + out) for each targeted linear layer of each block."""
    sizes = {"q_proj": (shape.d_model, shape.d_model), "k_proj": (shape.d_model, shape.d_model), "v_proj": (shape.d_model, shape.d_model),
             "out_proj": (shape.d_model, shape.d_model), "fc_in": (shape.d_model, shape.d_ff), "fc_out": (shape.d_ff, shape.d_model)}
    return shape.blocks * sum(settings.lora_rank * sum(sizes[t]) for t in settings.lora_targets)


def _weight_bytes(shape: StageShape, settings: PlanSettings) -> int:
    if not settings.lora_rank:
        return FP32 * shape.parameters
    matrices = shape.blocks * shape.block_matrices
    rest = shape.parameters - matrices
    base = {32: FP32 * matrices, 8: matrices + FP32 * shape.blocks * (4 * shape.d_model + 2 * shape.d_ff),
            4: matrices // 2 + FP32 * matrices // 64}[settings.lora_base_bits]
    return base + FP32 * rest + FP32 * lora_parameters(shape, settings)


def _trained(shape: StageShape, settings: PlanSettings) -> int:
    return lora_parameters(shape, settings) if settings.lora_rank else shape.parameters


def _optimizer_bytes(shape: StageShape, settings: PlanSettings) -> int:
    trained = _trained(shape, settings)
    if settings.optimizer != "adamw8bit":
        return 2 * FP32 * trained
    small = shape.blocks * (shape.d_ff + 3 * shape.d_model) + (2 * shape.d_model + shape.vocab if shape.head else 0)  # biases, LayerNorms
    large = trained - (0 if settings.lora_rank else small)
    return 2 * large + 2 * FP32 * (large // ADAMW_8BIT_BLOCK) + (0 if settings.lora_rank else 2 * FP32 * small)


def _block_saved(shape: StageShape, settings: PlanSettings) -> int:
    """Bytes one GPT-J block keeps for its backward, per microbatch (transformers 5.24, eager attention).

    fp32: the block input and ln_1's statistics, ln_1's output, q, k and v, the attention
    probabilities, the attention output, rotary's four sin/cos expansions, fc_in's output with
    the four tensors gelu_new keeps. Autocast: the block input and statistics stay fp32; 16-bit
    copies of ln_1's output (one per linear layer that reads it: q, k, v, fc_in), q, k, v and
    the attention output; the probabilities both in fp32 and 16-bit; gelu's tensors in 16 bits;
    and a 16-bit copy of each weight matrix."""
    b, s, d, h, f, r = settings.micro_batch, settings.seq_len, shape.d_model, shape.n_head, shape.d_ff, shape.rotary_dim
    tokens = b * s
    if settings.precision == "float32":
        return FP32 * (6 * tokens * d + 2 * tokens + 4 * tokens * r + b * h * s * s + 5 * tokens * f)
    return (FP32 * (tokens * d + 2 * tokens + 4 * tokens * r + b * h * s * s) + HALF * (8 * tokens * d + b * h * s * s + 5 * tokens * f)
            + HALF * shape.block_matrices)


def _ends_saved(shape: StageShape, settings: PlanSettings) -> int:
    """What the stage keeps outside its blocks, per microbatch: the attention mask it hands every block, its
    output, and at the last stage ln_f, the logits and the loss's log-softmax."""
    b, s, d, v = settings.micro_batch, settings.seq_len, shape.d_model, shape.vocab
    tokens = b * s
    kept = FP32 * b * s * s + FP32 * tokens * d
    if shape.head:
        logits = (FP32 if settings.precision == "float32" else HALF + FP32) * tokens * v  # autocast: 16-bit logits, then .float()
        kept += FP32 * (2 * tokens * d + 2 * tokens) + logits + FP32 * tokens * v + (HALF * d * v if settings.precision != "float32" else 0)
    return kept


def _backward_transient(shape: StageShape, settings: PlanSettings) -> int:
    """The largest short-lived tensors of a backward. It walks a block from its end: the gradients of the MLP's
    widest activations come first; by the time the attention probabilities' gradients (two of B x H x L x L)
    exist, the MLP's five saved d_ff-wide tensors are freed. At the head, the logits' gradient. With
    checkpointing, the block being recomputed holds its saved tensors meanwhile."""
    b, s, d, h, f = settings.micro_batch, settings.seq_len, shape.d_model, shape.n_head, shape.d_ff
    tokens = b * s
    grads = max(FP32 * (2 * tokens * f + 2 * tokens * d), FP32 * (2 * b * h * s * s - 5 * tokens * f))
    if shape.head:
        grads = max(grads, 2 * FP32 * tokens * shape.vocab)
    if settings.lora_rank and settings.lora_base_bits < 32:  # a quantised base matrix is dequantised for each product
        grads += (FP32 if settings.lora_base_bits == 4 else HALF) * shape.d_model * shape.d_ff
    return grads + (_block_saved(shape, settings) if settings.activation_checkpointing else 0)


def _largest_trained(shape: StageShape, settings: PlanSettings) -> int:
    if settings.lora_rank:
        return settings.lora_rank * (shape.d_model + shape.d_ff)
    return max(shape.d_model * shape.d_ff, shape.vocab * shape.d_model if shape.embedding or shape.head else 0)


def plan_stage(shape: StageShape, settings: PlanSettings) -> MemoryPlan:
    """The bytes a stage needs, by part, and the peak they add up to (see the module docstring)."""
    trained = _trained(shape, settings)
    if settings.activation_checkpointing:
        per_microbatch = FP32 * settings.micro_batch * settings.seq_len * shape.d_model * shape.blocks + _ends_saved(shape, settings)
    else:
        per_microbatch = _block_saved(shape, settings) * shape.blocks + _ends_saved(shape, settings)
    parts = {
        "weights": _weight_bytes(shape, settings),
        "gradients": FP32 * trained,
        "optimizer": _optimizer_bytes(shape, settings),
        "anchor": settings.sync_copies * FP32 * trained,
        "aqsgd_cache": settings.aqsgd_cache_bytes,
        "activations": settings.in_flight * per_microbatch,
        "backward": _backward_transient(shape, settings),
        "sync": 2 * FP32 * trained,
        "step": (3 if settings.optimizer == "adamw8bit" else 1) * FP32 * _largest_trained(shape, settings),
    }
    resident = sum(parts[k] for k in ("weights", "gradients", "optimizer", "anchor", "aqsgd_cache"))
    peak = resident + max(parts["activations"] + parts["backward"], parts["sync"] + parts["step"])
    return MemoryPlan(parts, peak)


def plan_layer_ranges(config, settings: PlanSettings, budget: int, stages: int = 0) -> list[tuple[int, int]]:
    """Contiguous layer ranges whose stages each fit ``budget`` bytes: ``stages`` of them (0: as few as fit),
    the largest stage as small as it can be. Raises ValueError, saying what would fit, if none does."""
    n = config.n_layer

    def fits(start: int, end: int) -> bool:
        return plan_stage(StageShape.of(config, start, end), settings).peak <= budget

    def greedy(limit_blocks: int) -> list[tuple[int, int]] | None:
        ranges, start = [], 0
        while start < n:
            end = start
            while end < n and end - start < limit_blocks and fits(start, end + 1):
                end += 1
            if end == start:
                return None
            ranges.append((start, end))
            start = end
        return ranges

    best = None
    if not stages:  # as few stages as fit: each as large as it can be
        best = greedy(n)
    else:  # the smallest cap on blocks per stage that needs no more stages than asked: balanced stages
        for limit in range(-(-n // stages), n + 1):
            ranges = greedy(limit)
            if ranges is not None and len(ranges) <= stages:
                best = ranges
                break
    if best is None:
        fewest = greedy(n) if stages else None
        if fewest is not None:
            raise ValueError(f"{stages} stages cannot each fit {budget / GIB:.1f} GiB; it takes at least {len(fewest)} "
                             f"(--stages {len(fewest)}, or --stages 0 for as few as fit)")
        one = plan_stage(StageShape.of(config, n // 2, n // 2 + 1), settings)
        raise ValueError(f"not even one block fits {budget / GIB:.1f} GiB: a middle stage of one block needs {one.describe()}")
    if stages and len(best) < stages:
        best = _split_evenly(best, stages)
    return best


def _split_evenly(ranges: list[tuple[int, int]], stages: int) -> list[tuple[int, int]]:
    """Split the widest ranges until there are ``stages`` (a narrower stage never needs more memory)."""
    ranges = list(ranges)
    while len(ranges) < stages:
        i = max(range(len(ranges)), key=lambda k: ranges[k][1] - ranges[k][0])
        a, b = ranges[i]
        if b - a < 2:
            raise ValueError(f"{stages} stages need more blocks than the model has")
        mid = (a + b + 1) // 2
        ranges[i : i + 1] = [(a, mid), (mid, b)]
    return ranges


SYNC_COPIES = {"none": 0, "cocktail": 1, "sparseloco": 2}  # --sync-compression -> PlanSettings.sync_copies


def plan_settings(train, aqsgd_cache_bytes: int = 0) -> PlanSettings:
    """The planner's settings from a run's ``TrainConfig`` (``aqsgd_cache_bytes``: a peer's --activation-cache-mb)."""
    return PlanSettings(
        seq_len=train.seq_len, micro_batch=train.micro_batch_size, in_flight=train.max_inflight, precision=train.compute_dtype,
        optimizer=train.optimizer, activation_checkpointing=train.activation_checkpointing, sync_copies=SYNC_COPIES[train.sync_compression],
        aqsgd_cache_bytes=aqsgd_cache_bytes if train.activation_compression == "aqsgd" else 0,
        lora_rank=train.lora_rank, lora_targets=train.lora_target_modules, lora_base_bits=train.lora_base_bits,
    )


def fit_advice(config, layer_start: int, layer_end: int, settings: PlanSettings, free: int) -> str:
    """Why a stage does not fit ``free`` bytes, what would, and which settings change it."""
    plan = plan_stage(StageShape.of(config, layer_start, layer_end), settings)
    fitting = [n for n in range(1, layer_end - layer_start + 1)
               if plan_stage(StageShape.of(config, layer_start, layer_start + n), settings).peak <= free]
    lighter = []
    if settings.precision == "float32":
        lighter.append("--compute-dtype bfloat16")
    if settings.optimizer == "adamw":
        lighter.append("--optimizer adamw8bit")
    if not settings.activation_checkpointing:
        lighter.append("--activation-checkpointing")
    would = f"this device fits {max(fitting)} of its blocks with these settings" if fitting else "not one of its blocks fits this device"
    return (f"stage of blocks [{layer_start}, {layer_end}) needs {plan.describe()}, and this device has {free / GIB:.1f} GiB free; "
            f"{would}. The organiser can plan smaller stages (coordinator --stage-memory-gb, or more --stages)"
            + (f" or lighter ones ({', '.join(lighter)})" if lighter else "") + "; or join with a larger device")
