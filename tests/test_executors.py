"""The executors: the device path equals the host path (the reference) bit for bit on CPU, and on CUDA a layer
queues all its work without a host sync."""

import pytest
import torch
from conftest import load_qwen
from layer_fixtures import build_experts, realb_copy, routing

import realb_hf
from realb_hf.experts import device_path, host_path, weights_for
from realb_hf.tiny import build_tiny_model, tiny_gpt_oss_config

cuda = pytest.mark.cuda


def experts(device="cpu", num_experts=8, **config):
    return realb_copy(build_experts(64, 32, num_experts, device), **config)


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def both_paths(module, x, index, weights, flags):
    precisions = tuple("fp8" if f else "bf16" for f in flags.tolist())
    with torch.no_grad():
        host = host_path.run(module, x, index, weights, precisions, "bf16")
        low = weights_for(module, "fp8", flags=flags)
        free = device_path.run(module, x, index, weights, flags, "bf16", low)
    return host, free


@pytest.mark.parametrize("cache", ["persistent", "on_the_fly"])
@pytest.mark.parametrize("low_set", [(0, 1, 2, 3), (5,), (), tuple(range(8))])
def test_device_path_equals_host_path_bit_for_bit(cache, low_set):
    module = experts(policy="all_low", low_precision="fp8", weight_cache=cache)
    x, index, weights = routing(60, 8, 4, 64, "cpu", 0)
    x[7, 3] = float("inf")  # this token's rows run in bf16 on both paths
    host, free = both_paths(module, x, index, weights, torch.tensor([e in low_set for e in range(8)]))
    assert_same(free, host)


def test_other_ranks_experts_contribute_nothing():
    """EP sentinels (ids >= num_experts) as transformers' EP passes them to a rank's local experts."""
    module = experts(policy="all_low", low_precision="fp8")
    x, index, weights = routing(40, 8, 4, 64, "cpu", 1)
    index = torch.where(index >= 6, 8, index)
    host, free = both_paths(module, x, index, weights, torch.tensor([True, False] * 4))
    assert_same(free, host)


def test_empty_batch():
    module = experts(policy="all_low", low_precision="fp8")
    x, index, weights = routing(0, 8, 4, 64, "cpu", 0)
    flags = torch.ones(8, dtype=torch.bool)
    with torch.no_grad():
        out = device_path.run(module, x, index, weights, flags, "bf16", weights_for(module, "fp8", flags=flags))
    assert out.shape == (0, 64)


def test_device_path_covers_only_plain_swiglu_experts_in_padding_formats():
    module = experts(policy="all_low")
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert not device_path.supports(module, x)  # "auto": CUDA only
    module.realb_device_path = "always"
    assert device_path.supports(module, x) and device_path.runs_formats("bf16", "fp8")
    assert not device_path.runs_formats("bf16", "nvfp4")  # fp4 emulation slices groups on the host
    assert not device_path.supports(module, x.float())
    module.realb_fuse_swiglu = False  # the model's own gating: host path
    assert not device_path.supports(module, x)
    gpt_oss = build_tiny_model(tiny_gpt_oss_config())  # biases and a clamped gate: host path
    mod = next(m for m in gpt_oss.modules() if type(m).__name__.endswith("Experts"))
    mod = realb_hf.apply_realb_to_experts(mod)
    mod.realb_device_path = "always"
    assert not device_path.supports(mod, x)


def test_device_path_mode_is_validated():
    module = experts(policy="all_low")
    module.realb_device_path = "sometimes"
    x, index, weights = routing(4, 8, 2, 64, "cpu", 0)
    with pytest.raises(ValueError, match="realb_device_path.*'auto', 'always', 'never'"):
        module(x, index, weights)


@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_model_with_device_decisions_matches_host_decisions(qwen_dir, qwen_batch, monkeypatch, granularity):
    """The whole tiny model, decisions made by the device decision: same logits and telemetry."""
    config = dict(
        policy="realb", ep_size=4, batch_threshold=0, modality_threshold=0.0, imbalance_threshold=0.0,
        granularity=granularity, low_cost_ratio=0.2,  # lowering one expert can be enough: ranks split
    )
    host_model = load_qwen(qwen_dir, **config)
    with torch.no_grad():
        host_logits = host_model(**qwen_batch.kwargs).logits
    calls = []
    original = device_path.run
    monkeypatch.setattr(device_path, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(realb_hf.RealbExperts, "realb_device_path", "always")
    free_model = load_qwen(qwen_dir, **config)
    with torch.no_grad():
        free_logits = free_model(**qwen_batch.kwargs).logits
    assert calls, "the device path did not run"
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
    x, index, weights = routing(512, 16, 4, 64, "cuda", 0)
    index = torch.where(index < 8, index % 4, index)  # rank 0 (experts 0-3) overloaded
    with torch.no_grad():
        module(x, index, weights)  # first call: persistent copies, Triton compilation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = module(x, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        precisions = tuple("fp8" if e < 4 else "bf16" for e in range(16))
        host = host_path.run(module, x, index, weights, precisions, "bf16")
    record = module.realb_runtime.telemetry.records[-1]
    assert record.lowered_experts == 4
    torch.testing.assert_close(out, host, rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_nothing_lowered_matches_stock():
    module = experts("cuda", num_experts=16, policy="off")
    x, index, weights = routing(700, 16, 4, 64, "cuda", 3)
    flags = torch.zeros(16, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        stock = module(x, index, weights)
        free = device_path.run(module, x, index, weights, flags, "bf16", weights_for(module, "fp8", flags=flags))
    torch.testing.assert_close(free, stock, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("path", ["host", "device"])
def test_rows_too_large_for_fp8_run_in_high_precision(device, path):
    """GPU fp8 epilogues scale the accumulator by the activation scale first and overflow near 1e30: rows beyond
    `LOW_PRECISION_LIMIT` (and inf/NaN rows) run in bf16 on every path, so they give the stock result exactly."""
    from realb_hf.kernels.sort import LOW_PRECISION_LIMIT

    stock = build_experts(64, 32, 8, device)
    with torch.no_grad():
        stock.gate_up_proj.mul_(1e-15)  # so that SwiGLU of rows near 1e31 stays finite in bf16
    module = realb_copy(stock, policy="all_low", low_precision="fp8")
    module.realb_device_path = "always" if path == "device" else "never"
    x, index, weights = routing(40, 8, 2, 64, device, 0)
    x[3] *= 1e31  # past the limit; the stock outputs stay finite
    x[5, 0] = LOW_PRECISION_LIMIT * 2
    with torch.no_grad():
        want, got = stock(x, index, weights), module(x, index, weights)
    assert torch.isfinite(got[3]).all() and torch.equal(got[3], want[3]) and torch.equal(got[5], want[5])
    assert not torch.equal(got[0], want[0])  # the other rows ran in fp8
