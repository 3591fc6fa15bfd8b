"""Replica-sync compression: shared random masks, exact error feedback, bytes per parameter, garbage refused."""

from __future__ import annotations

import pytest
import torch

from peer.compression import cocktail
from peer.compression.cocktail import SyncCompressionConfig, nbytes, random_mask_indices

CONFIG = SyncCompressionConfig()
N = 100_003  # not a multiple of 8, of the bucket, or of anything else


def decompress(payload, seed, config=CONFIG, numel=N):
    return cocktail.decompress(payload, numel, seed, config)


class ErrorFeedbackCompressor:
    """The error-feedback loop replica sync runs (there the residual lives in the replica's weights)."""

    def __init__(self, numel, config, device="cpu"):
        self.config = config
        self.error = torch.zeros(numel, dtype=torch.float32, device=device)

    def compress(self, x, seed):
        payload, sent = cocktail.compress(x + self.error, seed, self.config)
        self.error = x + self.error - sent
        return payload


def test_masks_are_shared_by_seed_sorted_and_of_the_right_size():
    a = random_mask_indices(N, 0.1, seed=5, device="cpu")
    assert torch.equal(a, random_mask_indices(N, 0.1, seed=5, device="cpu"))
    assert not torch.equal(a[:100], random_mask_indices(N, 0.1, seed=6, device="cpu")[:100])
    assert a.dtype == torch.int64 and bool((a[1:] > a[:-1]).all()) and 0 <= a[0] and a[-1] < N
    assert abs(a.numel() / N - 0.1) < 0.005  # each coordinate kept with probability 0.1
    big = random_mask_indices(10_000_000, 0.1, seed=1)  # drawn in several chunks
    assert abs(big.numel() / 1e7 - 0.1) < 1e-3 and bool((big[1:] > big[:-1]).all())
    assert random_mask_indices(0, 0.1, seed=1).numel() == 0 and random_mask_indices(50, 1.0, seed=1).numel() == 50


@pytest.mark.parametrize("config", [CONFIG, SyncCompressionConfig(bits=2), SyncCompressionConfig(bits=8, bucket=64),
                                    SyncCompressionConfig(random_ratio=1.0, topk_ratio=1.0)])
def test_error_feedback_conserves_the_sum(config):
    compressor = ErrorFeedbackCompressor(N, config)
    for round_ in range(6):
        x = torch.randn(N, generator=torch.Generator().manual_seed(round_))
        old = compressor.error.clone()
        sent = decompress(compressor.compress(x, seed=round_), seed=round_, config=config)
        # sent + new residual == x + old residual (measured: exactly equal in every round for every config here)
        assert (sent + compressor.error - (x + old)).abs().max().item() <= 1e-6
        assert (sent != 0).sum() <= round(N * config.random_ratio * config.topk_ratio * 1.1) + 1


def test_replicas_with_one_seed_send_on_one_random_subset():
    workers = [ErrorFeedbackCompressor(N, CONFIG) for _ in range(2)]
    grads = [torch.randn(N), torch.randn(N)]
    sent = [decompress(w.compress(g, seed=42), seed=42) for w, g in zip(workers, grads)]
    subset = torch.zeros(N, dtype=torch.bool)
    subset[random_mask_indices(N, CONFIG.random_ratio, seed=42)] = True
    for s in sent:
        assert bool(subset[s != 0].all())  # each replica's values sit inside the shared subset
    assert not torch.equal(sent[0] != 0, sent[1] != 0)  # but each picks its own top-k inside it
    other = decompress(ErrorFeedbackCompressor(N, CONFIG).compress(grads[0], seed=43), seed=43)
    assert not bool(subset[other != 0].all())


def test_bytes_per_parameter_and_ratio_against_fp32():
    n = 1 << 22
    payload = ErrorFeedbackCompressor(n, CONFIG).compress(torch.randn(n), seed=0)
    per_param = nbytes(payload) / n
    # measured 0.0231 B/param (mask 0.0125, values 0.0100, scales 0.0006), 173x less than fp32's 4
    assert per_param == pytest.approx(0.0231, rel=0.02)
    assert 4 / per_param > 150


def test_running_sum_of_a_constant_gradient_converges():
    g = torch.randn(N, generator=torch.Generator().manual_seed(0))
    compressor = ErrorFeedbackCompressor(N, CONFIG)
    total, errors = torch.zeros(N), {}
    for t in range(1, 401):
        total += decompress(compressor.compress(g, seed=t), seed=t)
        if t in (10, 100, 400):
            errors[t] = ((total - t * g).norm() / (t * g).norm()).item()
    # measured relative error of the running sum: 0.80 at 10 rounds, 0.23 at 100, 0.058 at 400
    assert errors[10] > errors[100] > errors[400] and errors[400] < 0.1


def _payload():
    return ErrorFeedbackCompressor(N, CONFIG).compress(torch.randn(N), seed=3)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: p.pop("mask"), "needs 'mask'"),
        (lambda p: p.update(meta=p["meta"].int()), "int64"),
        (lambda p: p["meta"].__setitem__(0, N + 1), "numel"),
        (lambda p: p["meta"].__setitem__(1, 7), "random subset"),
        (lambda p: p["meta"].__setitem__(3, 5), "meta says"),
        (lambda p: p.update(mask=p["mask"][:-1]), "mask must be"),
        (lambda p: p["mask"].__setitem__(0, p["mask"][0] ^ 1), "bits"),
        (lambda p: p["mask"].__setitem__(-1, 255), "bits"),  # padding bits set
        (lambda p: p.update({"values.codes": p["values.codes"][:-1]}), "codes"),
        (lambda p: p.pop("values.scales"), "missing"),
    ],
)
def test_decompress_refuses_garbage(change, message):
    payload = _payload()
    change(payload)
    with pytest.raises(ValueError, match=message):
        decompress(payload, seed=3)


def test_decompress_refuses_another_seed_or_config():
    with pytest.raises(ValueError, match="seed"):
        decompress(_payload(), seed=4)
    with pytest.raises(ValueError, match="bits=2"):
        decompress(_payload(), seed=3, config=SyncCompressionConfig(bits=2))


def test_compress_checks_its_input():
    with pytest.raises(ValueError, match="float32"):
        cocktail.compress(torch.randn(N).half(), seed=0, config=CONFIG)


@pytest.mark.parametrize("kwargs,message", [({"random_ratio": 0.0}, "random_ratio"), ({"topk_ratio": 1.5}, "topk_ratio"),
                                            ({"bits": 3}, "bits"), ({"bucket": 100}, "bucket")])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyncCompressionConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compressor_matches_cpu_decompression():
    assert torch.equal(random_mask_indices(N, 0.1, 9, "cuda").cpu(), random_mask_indices(N, 0.1, 9, "cpu"))
    compressor = ErrorFeedbackCompressor(N, CONFIG, device="cuda")
    x = torch.randn(N, device="cuda")
    payload = compressor.compress(x, seed=9)
    assert compressor.error.is_cuda and all(t.is_cuda for t in payload.values() if t.numel() > 4)
    on_cpu = decompress({k: v.cpu() for k, v in payload.items()}, seed=9)
    assert torch.equal(on_cpu, cocktail.decompress(payload, N, 9, CONFIG).cpu())
