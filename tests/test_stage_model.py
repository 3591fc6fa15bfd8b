"""Stage model: mask semantics pinned against hand-written attention; stages compose into GPT-J."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM

from peer.stage_model import StageModel, attention_bias, summed_token_loss
from proto.manifest import parameter_checksum


def tiny_config(**kw) -> GPTJConfig:
    cfg = GPTJConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=4, n_head=2, rotary_dim=8,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def test_attention_bias_is_causal_plus_bidirectional_prefix():
    bias = attention_bias(5, torch.tensor([0, 3]), torch.float32, "cpu")
    allowed = bias == 0
    assert bias.shape == (2, 1, 5, 5)
    assert torch.equal(allowed[0, 0], torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    # Prefix of 3: the first three positions see each other; later ones stay causal.
    assert allowed[1, 0, 0, :3].all() and not allowed[1, 0, 0, 3:].any()
    assert allowed[1, 0, 4].all() and not allowed[1, 0, 3, 4]
    assert (bias[~allowed] == torch.finfo(torch.float32).min).all()


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def reference_block(block, h, prefix_len, cfg):
    """GPT-J block written out by hand: rotary on the first rotary_dim dims, explicit keep/drop mask."""
    attn = block.attn
    x = block.ln_1(h)
    b, l, d = x.shape
    nh, hd = cfg.n_head, d // cfg.n_head
    q = attn.q_proj(x).view(b, l, nh, hd)
    k = attn.k_proj(x).view(b, l, nh, hd)
    v = attn.v_proj(x).view(b, l, nh, hd).transpose(1, 2)
    rd = cfg.rotary_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = torch.arange(l, dtype=torch.float32)[:, None] * inv_freq[None]
    sin = torch.repeat_interleave(angles.sin(), 2, dim=-1)[None, :, None, :]
    cos = torch.repeat_interleave(angles.cos(), 2, dim=-1)[None, :, None, :]

    def rope(t):
        rot, rest = t[..., :rd], t[..., rd:]
        return torch.cat([rot * cos + rotate_every_two(rot) * sin, rest], dim=-1)

    q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    i = torch.arange(l)[:, None]
    j = torch.arange(l)[None, :]
    keep = (j <= i) | (j < prefix_len)
    scores = scores.masked_fill(~keep, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, l, d)
    return h + attn.out_proj(out) + block.mlp(x)


@pytest.mark.parametrize("prefix_len", [0, 5])
def test_stage_matches_hand_written_attention(prefix_len):
    torch.manual_seed(0)
    cfg = tiny_config()
    stage = StageModel(cfg, 1, 2)
    h = torch.randn(2, 9, cfg.n_embd)
    out = stage(h, torch.full((2,), prefix_len))
    expected = reference_block(stage.transformer.h["1"], h, prefix_len, cfg)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_prefix_lm_cannot_see_targets():
    """Changing a token after the prefix leaves every earlier position's output unchanged."""
    torch.manual_seed(1)
    cfg = tiny_config()
    stage = StageModel(cfg, 0, 4)
    ids = torch.randint(0, 300, (1, 12))
    prefix = torch.tensor([6])
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 300
    a, b = stage(ids, prefix), stage(changed, prefix)
    torch.testing.assert_close(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])
    # ... while a change inside the prefix is seen by every prefix position (bidirectional).
    early = ids.clone()
    early[0, 4] = (ids[0, 4] + 1) % 300
    assert not torch.allclose(stage(early, prefix)[0, 0], a[0, 0])


def test_stages_compose_into_gptj_exactly():
    torch.manual_seed(2)
    cfg = tiny_config()
    full = GPTJForCausalLM(cfg).eval()
    state = full.state_dict()
    stages = [StageModel(cfg, a, b) for a, b in [(0, 1), (1, 3), (3, 4)]]
    for s in stages:
        own = s.state_dict()
        s.load_state_dict({k: state[k] for k in own})
    ids = torch.randint(0, 300, (2, 16))
    out = ids
    for s in stages:
        out = s(out, torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(out, full(ids).logits, rtol=0, atol=0)


def test_summed_loss_counts_only_masked_positions():
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    assert summed_token_loss(logits, targets, mask).item() == pytest.approx((per_token * mask.flatten()).sum().item())


def test_checksum_sees_a_single_bit():
    cfg = tiny_config()
    torch.manual_seed(3)
    a = StageModel(cfg, 0, 1)
    b = StageModel(cfg, 0, 1)
    b.load_state_dict(a.state_dict())
    assert parameter_checksum(a) == parameter_checksum(b)
    with torch.no_grad():
        w = b.transformer.h["0"].mlp.fc_in.weight
        w.view(torch.int32)[0, 0] ^= 1
    assert parameter_checksum(a) != parameter_checksum(b)


def test_bad_layer_range_is_refused():
    with pytest.raises(ValueError, match="do not fit"):
        StageModel(tiny_config(), 2, 9)


def test_delta_sync_shares_the_anchor_and_keeps_the_residual_private():
    """Checksums, state hand-offs and checkpoints carry the agreed weights, not a replica's own residual."""
    from peer.replica_sync import StageSync
    from peer.stage_runtime import StageRuntime
    from peer.weights import export_stage, import_stage
    from proto.run_config import TrainConfig

    torch.manual_seed(0)
    train = TrainConfig(sync_compression="cocktail")
    a = StageRuntime(tiny_config(), train, 0, 2, torch.device("cpu"))
    b = StageRuntime(tiny_config(), train, 0, 2, torch.device("cpu"))
    sync_a, sync_b = StageSync(a, None, train, 0), StageSync(b, None, train, 0)
    b.load_flat_params(a.flat_params())
    assert sync_a.checksum() == sync_b.checksum()
    sync_a._reset_anchor()
    sync_b._reset_anchor()
    a.load_flat_params(sync_a.anchor + 0.01 * torch.randn_like(sync_a.anchor))  # a's private, unsent progress
    assert sync_a.checksum() == sync_b.checksum() != parameter_checksum(a.model)
    tensors, extras = export_stage(a, sync_a)
    c = StageRuntime(tiny_config(), train, 0, 2, torch.device("cpu"))
    sync_c = StageSync(c, None, train, 0)
    import_stage(c, sync_c, tensors, extras, next_round=5)
    assert torch.equal(c.flat_params(), sync_b.anchor) and torch.equal(sync_c.anchor, sync_b.anchor)


def test_a_microbatch_that_comes_through_again_adds_its_gradients_once():
    """An upstream route break reroutes a microbatch this stage already did: input gradient again, parameters once."""
    from peer.stage_runtime import StageRuntime
    from proto.run_config import TrainConfig

    torch.manual_seed(0)
    rt = StageRuntime(tiny_config(), TrainConfig(), 2, 4, torch.device("cpu"))
    rt.next_round = 1
    hidden, prefix = torch.randn(2, 8, 32), torch.tensor([0, 3])
    targets, mask = torch.randint(0, 300, (2, 8)), torch.ones(2, 8)

    def once(microbatch):
        ctx = rt.forward(1, hidden, prefix, mask, microbatch)
        return rt.loss_backward(ctx, targets, mask)

    loss, tokens, grad = once(3)
    after_first, tokens_first = rt.flat_gradients(), rt.round_tokens
    again_loss, again_tokens, again_grad = once(3)
    assert torch.equal(rt.flat_gradients(), after_first) and rt.round_tokens == tokens_first == 16
    assert again_loss == loss and again_tokens == tokens and torch.allclose(again_grad, grad)
    once(4)  # another microbatch does accumulate
    assert rt.round_tokens == 32 and not torch.equal(rt.flat_gradients(), after_first)
    rt.discard_gradients()
    once(3)  # a new round's microbatch 3 is new again
    assert rt.round_tokens == 16
    # Middle stages: the same through backward() with an output gradient.
    mid = StageRuntime(tiny_config(), TrainConfig(), 1, 2, torch.device("cpu"))
    mid.next_round = 1
    out_grad = torch.randn(2, 8, 32)
    first = mid.backward(mid.forward(1, hidden, prefix, mask, 0), out_grad)
    snapshot = mid.flat_gradients()
    second = mid.backward(mid.forward(1, hidden, prefix, mask, 0), out_grad)
    assert torch.allclose(first, second) and torch.equal(mid.flat_gradients(), snapshot)
