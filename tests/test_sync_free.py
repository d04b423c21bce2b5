"""The sync-free mixed forward: same rows, same results as the host path, and (on CUDA) no host sync."""

import pytest
import torch
from conftest import load_qwen

import realb_hf
from realb_hf import sync_free
from realb_hf.bench.hot_rank import build_experts, realb_variant, routing
from realb_hf.experts import RealbExperts
from realb_hf.tiny import build_tiny_model, tiny_gpt_oss_config

cuda = pytest.mark.cuda


def experts(device="cpu", num_experts=8, **config):
    module = build_experts(64, 32, num_experts, torch.device(device))
    return realb_variant(module, **config)


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cache", ["persistent", "on_the_fly"])
@pytest.mark.parametrize("low_set", [(0, 1, 2, 3), (5,), (), tuple(range(8))])
def test_equals_host_path_bit_for_bit(cache, low_set):
    module = experts(policy="all_low", low_precision="fp8", weight_cache=cache)
    x, index, weights = routing(60, 8, 4, 64, torch.device("cpu"), 0)
    x[7, 3] = float("inf")  # this token's rows run in bf16 on both paths
    precisions = tuple("fp8" if e in low_set else "bf16" for e in range(8))
    flags = torch.tensor([e in low_set for e in range(8)])
    with torch.no_grad():
        host = module._realb_mixed_forward(x, index, weights, precisions, "bf16")
        free = module._realb_sync_free(x, index, weights, flags, "bf16", "fp8")
    assert_same(free, host)


def test_other_ranks_experts_contribute_nothing():
    """EP sentinels (ids >= num_experts) as transformers' EP passes them to a rank's local experts."""
    module = experts(policy="all_low", low_precision="fp8")
    x, index, weights = routing(40, 8, 4, 64, torch.device("cpu"), 1)
    index = torch.where(index >= 6, 8, index)
    flags = torch.tensor([True, False] * 4)
    with torch.no_grad():
        host = module._realb_mixed_forward(x, index, weights, tuple("fp8" if f else "bf16" for f in flags), "bf16")
        free = module._realb_sync_free(x, index, weights, flags, "bf16", "fp8")
    assert_same(free, host)


def test_empty_batch():
    module = experts(policy="all_low", low_precision="fp8")
    x, index, weights = routing(0, 8, 4, 64, torch.device("cpu"), 0)
    with torch.no_grad():
        out = module._realb_sync_free(x, index, weights, torch.ones(8, dtype=torch.bool), "bf16", "fp8")
    assert out.shape == (0, 64)


def test_covers_only_plain_swiglu_experts_in_padding_formats():
    module = experts(policy="all_low")
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert sync_free.covers(module, "bf16", "fp8", x)
    assert not sync_free.covers(module, "bf16", "nvfp4", x)  # fp4 emulation slices groups on the host
    assert not sync_free.covers(module, "bf16", "fp8", x.float())
    gpt_oss = build_tiny_model(tiny_gpt_oss_config())  # biases and a clamped gate: host path
    mod = next(m for m in gpt_oss.modules() if type(m).__name__.endswith("Experts"))
    mod.__class__ = realb_hf.experts.realb_class_for(type(mod))
    assert not sync_free.covers(mod, "bf16", "fp8", x)


@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_model_with_device_decisions_matches_host_decisions(qwen_dir, qwen_batch, monkeypatch, granularity):
    """The whole tiny model, decisions made by `lowered_experts_on_device`: same logits and telemetry."""
    config = dict(
        policy="realb", ep_size=4, batch_threshold=0, modality_threshold=0.0, imbalance_threshold=0.0,
        granularity=granularity, low_cost_ratio=0.2,  # lowering one expert can be enough: ranks split
    )
    host_model = load_qwen(qwen_dir, **config)
    with torch.no_grad():
        host_logits = host_model(**qwen_batch.kwargs).logits
    monkeypatch.setattr(
        RealbExperts, "_realb_sync_free_ok", lambda self, h, high, low: sync_free.covers(self, high, low, h)
    )
    calls = []
    original = RealbExperts._realb_sync_free
    monkeypatch.setattr(RealbExperts, "_realb_sync_free", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    free_model = load_qwen(qwen_dir, **config)
    with torch.no_grad():
        free_logits = free_model(**qwen_batch.kwargs).logits
    assert calls, "the sync-free path did not run"
    host_records = realb_hf.get_telemetry(host_model).records
    free_records = realb_hf.get_telemetry(free_model).records
    assert any(r.lowered_experts for r in host_records)
    if granularity == "expert":
        assert any("mixed" in r.precision_per_rank for r in host_records)
    assert free_records == host_records
    assert_same(free_logits, host_logits)


@cuda
@pytest.mark.parametrize("granularity", ["rank", "expert"])
@pytest.mark.parametrize("cache", ["persistent", "on_the_fly"])
def test_cuda_layer_queues_without_host_sync(cache, granularity):
    """policy realb (decided on the device) through fp8: `set_sync_debug_mode("error")` raises on any sync."""
    module = experts("cuda", num_experts=16, policy="realb", ep_size=4, batch_threshold=0, imbalance_threshold=0.0,
                     modality_threshold=0.0, low_precision="fp8", weight_cache=cache, granularity=granularity)
    module.realb_runtime.telemetry.enabled = True
    x, index, weights = routing(512, 16, 4, 64, torch.device("cuda"), 0)
    index = torch.where(index < 8, index % 4, index)  # rank 0 (experts 0-3) overloaded
    with torch.no_grad():
        module(x, index, weights)  # first call: persistent copies, Triton compilation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = module(x, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        flags = torch.zeros(16, dtype=torch.bool, device="cuda")
        flags[:4] = True
        precisions = tuple("fp8" if f else "bf16" for f in flags.tolist())
        host = module._realb_mixed_forward(x, index, weights, precisions, "bf16")
    record = module.realb_runtime.telemetry.records[-1]
    assert record.lowered_experts == 4
    torch.testing.assert_close(out, host, rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_nothing_lowered_matches_stock():
    module = experts("cuda", num_experts=16, policy="off")
    x, index, weights = routing(700, 16, 4, 64, torch.device("cuda"), 3)
    with torch.no_grad():
        stock = module(x, index, weights)
        free = module._realb_sync_free(x, index, weights, torch.zeros(16, dtype=torch.bool, device="cuda"), "bf16", "fp8")
    torch.testing.assert_close(free, stock, rtol=1e-2, atol=1e-2)
