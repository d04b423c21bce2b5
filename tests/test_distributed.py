"""ReaLB under real expert parallelism on CPU (gloo): torchrun with 2 and 4 processes.

- Equality (tests/ep_check.py, the harness GPUs run over NCCL): a tiny Qwen3-VL-MoE and a tiny
  DeepSeek-V3 loaded with `DistributedConfig(tp_size=N, ep_size=N)` (dense layers replicated, and with the model's
  own TP plan) and `DistributedConfig(fsdp_size=N, ep_size=N)`, in both token movements (all-reduce, all-to-all),
  against one process with virtual EP of the same size: same logits (bf16 tolerance), same decisions on every
  rank and as in one process, every rank ran its experts at the precision decided for it (fp8 / nvfp4 / bf16 /
  mixed), fp8 dispatch where a rank was lowered to fp8, persistent copies split over the ranks.
- Failure modes (this file run as a torchrun worker): wrong `RealbConfig.ep_size`, an EP size that does not divide
  the experts, a mesh larger than the world, TP-only MoE sharding, an unsupported token movement -> clear errors
  before any weight loads; a stalled rank -> the others raise `RealbCollectiveError` naming the collective after
  the configured timeout instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "ep_check.py"
FAMILIES = ("qwen3_vl_moe", "deepseek_v3")
MODES = ("all_reduce", "all_to_all")
STALL_TIMEOUT_S = 2.0
EP_PREFILL_VARIANTS = (
    "realb policy off",
    "realb nothing lowered (bf16 pipeline)",
    "realb rank, on_the_fly",
    "realb rank, on_the_fly, conversion counted",
    "realb rank, persistent",
    "fp8 everywhere (all_low, persistent)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: Path | str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`script`: a file, or a module name (run with torchrun's -m)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(script)] if isinstance(script, Path) else ["-m", script]
    cmd += list(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny checkpoints saved once: the two families (in the layout transformers' EP loader reads) and a
    Qwen3-VL-MoE with 3 experts (no EP size > 1 divides it)."""
    from realb_hf.ep import save_for_expert_parallel
    from realb_hf.tiny import TINY_FAMILIES, build_tiny_model, tiny_qwen3_vl_moe_config

    path = tmp_path_factory.mktemp("ep")
    for name in FAMILIES:
        save_for_expert_parallel(TINY_FAMILIES[name].build(seed=0), path / name)
    save_for_expert_parallel(build_tiny_model(tiny_qwen3_vl_moe_config(num_experts=3)), path / "three_experts")
    return path


@pytest.mark.parametrize("nproc, sync_free", [(2, False), (4, False), (2, True)])
def test_real_ep_equals_virtual_ep(nproc, sync_free, workdir, tmp_path):
    """`sync_free`: the all-reduce EP path as CUDA runs it (device-side decisions, no count read-backs)."""
    out = tmp_path / "check.json"
    forms = ("tp_replicated", "tp", "fsdp") if nproc == 2 else ("tp_replicated", "fsdp")
    extra = ("--sync-free-on-cpu", "--forms", "tp_replicated") if sync_free else ("--forms", *forms)
    proc = torchrun(nproc, CHECK, "--workdir", str(workdir), "--out", str(out), *extra)
    assert out.exists(), _tail(proc)
    checks = json.loads(out.read_text())["checks"]
    failed = [c for c in checks if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1) + _tail(proc)
    assert proc.returncode == 0, _tail(proc)

    covered = {(c["family"], c["mode"]) for c in checks if c["form"] == "tp_replicated"}
    assert covered == {(f, m) for f in FAMILIES for m in MODES}
    assert {c["form"] for c in checks} == ({"tp_replicated"} if sync_free else set(forms))
    for c in checks:
        assert c["decisions_agree"], c
        if c["form"] == "tp_replicated":
            assert c["rel_error"] < 1e-2, c
        if c["case"] == "static":  # per-rank precision as configured: rank 0 fp8, last rank nvfp4, others bf16
            assert [sorted(set(p)) for p in c["precision_per_rank_per_layer"]] == [["fp8"]] + [["bf16"]] * (
                nproc - 2
            ) + [["nvfp4"]]
            if c["mode"] == "all_to_all":  # rank 0 got fp8 tokens in every layer, the others bf16 tokens
                assert c["fp8_dispatch_per_rank"][0] == 2 and not any(c["fp8_dispatch_per_rank"][1:]), c
                assert all(b.get("dispatch_fp8", 0) > 0 for b in c["comm_bytes_per_rank"]), c
        if c["case"].startswith("realb"):
            assert c["layers_lowered"] > 0, c  # the batch triggers the policy
        if c["case"] == "realb_expert":
            assert any("mixed" in p for rank in c["precision_per_rank_per_layer"] for p in rank) or nproc == 4
        if c["case"] == "all_low_persistent":
            assert all(b > 0 for b in c["extra_memory_bytes_per_rank"]), c
        if c["mode"] == "all_reduce":
            assert all(not b for b in c["comm_bytes_per_rank"]), c  # ReaLB adds no communication there


def test_end_to_end_prefill_benchmark_runs_under_real_ep(tmp_path):
    """`realb_hf.bench.ep_prefill` on the tiny preset over gloo: every variant timed, ReaLB lowers layers."""
    out = tmp_path / "prefill.json"
    args = ["--preset", "tiny", "--layers", "2", "--requests", "4", "--request-tokens", "64", "--repeats", "1"]
    args += ["--warmup", "1", "--calibration-iters", "2", "--batch-threshold", "0", "--out", str(out)]
    proc = torchrun(2, "realb_hf.bench.ep_prefill", *args, timeout=240)
    assert proc.returncode == 0 and out.exists(), _tail(proc)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["batch_tokens"] == 256
    assert set(report["variants"]) == {"stock bf16 EP", *EP_PREFILL_VARIANTS}
    assert all(v["ms"] > 0 and v["tokens_per_s"] > 0 for v in report["variants"].values())
    assert report["variants"]["realb rank, persistent"]["layers_lowered_per_forward"] > 0
    assert report["variants"]["fp8 everywhere (all_low, persistent)"]["lowered_token_fraction"] == 1.0
    assert report["variants"]["realb policy off"]["layers_lowered_per_forward"] == 0
    # ReaLB's pipeline lowering nothing, and the lever's own gain measured against it; the imbalance threshold the
    # nothing-lowered variant raises does not leak into the variants after it
    nothing = report["variants"]["realb nothing lowered (bf16 pipeline)"]
    assert nothing["layers_lowered_per_forward"] == 0 and nothing["lowered_token_fraction"] == 0.0
    persistent = report["variants"]["realb rank, persistent"]
    assert persistent["speedup_vs_nothing_lowered"] == pytest.approx(nothing["ms"] / persistent["ms"])
    # with the conversion counted, a tiny layer's few pairs never pay for converting a rank's experts
    assert report["variants"]["realb rank, on_the_fly"]["layers_lowered_per_forward"] > 0
    assert report["variants"]["realb rank, on_the_fly, conversion counted"]["layers_lowered_per_forward"] == 0
    # a fixed bias (no calibration) still reports the skew it gives; the variants run in the order asked, and the
    # conversion cost one sets does not leak into the next
    order = ["realb rank, on_the_fly, conversion counted", "realb rank, on_the_fly", "realb policy off"]
    args += ["--router-bias", "0.5", "--variants", *order]
    proc = torchrun(2, "realb_hf.bench.ep_prefill", *args, timeout=240)
    assert proc.returncode == 0, _tail(proc)
    report = json.loads(out.read_text())
    assert report["router_bias"] == 0.5 and report["mean_max_over_mean"] >= 1.0
    assert list(report["variants"]) == ["stock bf16 EP", *order]
    assert report["variants"]["realb rank, on_the_fly"]["layers_lowered_per_forward"] > 0
    assert all(v["back_to_back_ms"] > 0 for v in report["variants"].values())


def test_layer_timing_with_profile_runs_under_real_ep(tmp_path):
    """`realb_hf.bench.ep_layer` (tiny dims, gloo) with `--profile`: every variant timed and profiled on every rank;
    ReaLB's all-to-all reports the host time of its five stages, the stock layer none."""
    out = tmp_path / "timing.json"
    args = ["--tiny", "--modes", "all_to_all", "--iters", "2", "--warmup", "1", "--profile", "1"]
    proc = torchrun(2, "realb_hf.bench.ep_layer", *args, "--out", str(out), timeout=240)
    assert proc.returncode == 0 and out.exists(), _tail(proc)
    rows = json.loads(out.read_text())["timing"]["rows"]
    from realb_hf.bench.ep_layer import CONVERSION_COUNTED

    assert {r["variant"] for r in rows} >= {"stock transformers bf16", "ReaLB policy realb, persistent copies",
                                            CONVERSION_COUNTED}  # fmt: skip
    stages = {f"realb::{s}" for s in ("count_exchange", "decide", "dispatch", "experts", "combine")}
    for row in rows:
        assert row["ms"] > 0 and len(row["profile_per_rank"]) == 2, row
        for profile in row["profile_per_rank"]:
            assert profile["calls"] == 1 and profile["wall_ms"] > 0 and profile["gpu_idle_ms"] is None
            expected = stages if row["variant"].startswith("ReaLB") else set()
            assert set(profile["sections_host_ms"]) == expected, row["variant"]
    assert "profile (ms per call)" in proc.stdout + proc.stderr


def test_layout_errors_come_before_any_weight_loads_and_nonfinite_rows(workdir, tmp_path):
    out = tmp_path / "errors.json"
    proc = torchrun(2, Path(__file__), "errors", str(workdir), str(out), timeout=240)
    assert out.exists(), _tail(proc)
    results = json.loads(out.read_text())
    assert proc.returncode == 0, _tail(proc)
    expected = {
        "ep_size_mismatch": ("ValueError", "RealbConfig.ep_size=4 does not match DistributedConfig(ep_size=2)"),
        "experts_not_divisible": ("ValueError", "DistributedConfig(ep_size=2) must divide the number of experts"),
        "mesh_larger_than_world": ("RuntimeError", "The parallel mesh requires 4 processes, but world_size is 2"),
        "tp_only_moe": ("ValueError", "TP-only MoE sharding"),
        "unsupported_token_movement": ("ValueError", "ReaLB runs with DistributedConfig(ep_implementation=...)"),
    }
    for name, (kind, text) in expected.items():
        got = results[name]
        assert got["type"] == kind and text in got["message"], (name, got)
        assert not got["weights_loaded"], name
    assert results["auto_ep_size"] == 2  # RealbConfig.ep_size left at 1 follows the EP world
    for rank in results["configs_differ"]:  # every rank refuses, naming what differs and on which rank
        assert rank["type"] == "ValueError", rank
        assert "different RealbConfig settings" in rank["message"], rank
        assert 'low_precision: rank 0 "fp8", rank 1 "nvfp4"' in rank["message"], rank
        assert "modality_threshold: rank 0 0.7, rank 1 0.9" in rank["message"], rank
        assert "policy" not in rank["message"].split("(")[1], rank  # fields that agree are not named
    finite, nonfinite = results["nonfinite"]["finite"], results["nonfinite"]["nonfinite"]
    assert finite["fp8_dispatch"] and finite["rel"] < 1e-2, finite
    assert not nonfinite["fp8_dispatch"] and nonfinite["same_nonfinite"] and nonfinite["rel"] < 1e-2, nonfinite


def test_tp_row_split_of_all_to_all_matches_dtensor(tmp_path):
    """At inference the all-to-all layer slices and gathers its TP rows without DTensor: the same rows."""
    out = tmp_path / "split.json"
    proc = torchrun(2, Path(__file__), "tp_split", str(tmp_path), str(out), timeout=120)
    assert proc.returncode == 0 and out.exists(), _tail(proc)
    assert json.loads(out.read_text()) == {str(n): True for n in (0, 1, 3, 4, 8)}


def test_fp8_dispatch_layout_with_rows_that_need_padding(tmp_path):
    """fp8 rows of 62 features plus their scale, then fp32 rows, in one byte all-to-all: each side gets exactly
    the rows it was sent (rank 0 quantized, rank 1 as they were)."""
    out = tmp_path / "mixed.json"
    proc = torchrun(2, Path(__file__), "mixed_dispatch", str(tmp_path), str(out), timeout=120)
    assert proc.returncode == 0 and out.exists(), _tail(proc)
    result = json.loads(out.read_text())
    assert result["same"], result
    assert result["comm"] == {"dispatch_fp8": 3 * 68, "dispatch_high": 2 * 62 * 4}  # rank 0's send, padded rows


def test_stalled_rank_raises_a_timeout_naming_the_collective(workdir, tmp_path):
    out = tmp_path / "stall.json"
    proc = torchrun(2, Path(__file__), "stall", str(workdir), str(out), timeout=240)
    assert out.exists(), _tail(proc)
    result = json.loads(out.read_text())
    assert result["type"] == "RealbCollectiveError", result
    assert "'all_gather of the routing counts'" in result["message"], result
    assert "collective timeout: 2 s" in result["message"] and "EP rank 0 of 2" in result["message"], result
    assert result["elapsed_s"] < STALL_TIMEOUT_S + 10, result


def test_all_to_all_issues_stock_collectives_and_checks_rows_only_when_fp8_can_run(workdir, tmp_path):
    """Per layer call, ReaLB's all-to-all issues the collectives stock transformers' does (one count exchange,
    the token exchange, the combine, the TP gather) whatever it lowers; the modality counts and the finite check
    ride in the count exchange, and rows are checked for fp8 only when the config can lower a rank to fp8. With
    nothing lowered the output equals stock's."""
    out = tmp_path / "collectives.json"
    proc = torchrun(2, Path(__file__), "collectives", str(workdir), str(out), timeout=240)
    assert proc.returncode == 0 and out.exists(), _tail(proc)
    result = json.loads(out.read_text())
    stock = result.pop("stock")
    assert len(stock["ops"]) == 4, result  # counts, tokens, outputs (all-to-all each), the TP gather
    for name, case in result.items():
        assert len(case["ops"]) == len(stock["ops"]), (name, case["ops"], stock["ops"])
        assert case["syncs"] == stock["syncs"], (name, case)
        assert case["checked"] == [name == "fp8 rank 0" or name == "nothing lowered"], (name, case)
        if name != "fp8 rank 0":
            assert case["equal"], (name, case)
        assert case["rel"] < 5e-2, (name, case)


# ---- workers (run by torchrun: python tests/test_distributed.py SCENARIO WORKDIR OUT) ------------------------


def _load(path, dc, **realb):
    import torch
    from transformers import AutoModelForImageTextToText

    import realb_hf

    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, distributed_config=dc, quantization_config=realb_hf.RealbConfig(**realb)
    ).eval()


def _errors_worker(workdir: Path) -> dict:
    from transformers import modeling_utils
    from transformers.distributed import DistributedConfig

    loaded = []
    original = modeling_utils.PreTrainedModel._load_pretrained_model

    def guard(*args, **kwargs):
        loaded.append(True)
        return original(*args, **kwargs)

    modeling_utils.PreTrainedModel._load_pretrained_model = staticmethod(guard)
    qwen, three = workdir / "qwen3_vl_moe", workdir / "three_experts"
    scenarios = {
        "ep_size_mismatch": (qwen, dict(tp_size=2, ep_size=2), dict(ep_size=4)),
        "experts_not_divisible": (three, dict(tp_size=2, ep_size=2), {}),
        "mesh_larger_than_world": (qwen, dict(tp_size=4, ep_size=4), {}),
        "tp_only_moe": (qwen, dict(tp_size=2), {}),
        "unsupported_token_movement": (qwen, dict(tp_size=2, ep_size=2, ep_implementation="deepgemm_megamoe"), {}),
    }
    results = {}
    for name, (path, dc_kwargs, realb) in scenarios.items():
        loaded.clear()
        try:
            _load(path, DistributedConfig(**dc_kwargs), **realb)
            results[name] = {"type": None, "message": "no error", "weights_loaded": bool(loaded)}
        except Exception as error:
            results[name] = {"type": type(error).__name__, "message": str(error), "weights_loaded": bool(loaded)}
    results["configs_differ"] = _configs_differ(qwen)
    model = _load(qwen, DistributedConfig(tp_size=2, ep_size=2), policy="off")
    results["auto_ep_size"] = model.realb.config.ep_size
    results["nonfinite"] = _nonfinite_rows(qwen)
    return results


def _configs_differ(path: Path) -> list[dict]:
    """Rank 0 loads with fp8 and M_d 0.7, rank 1 with nvfp4 and M_d 0.9: what each rank raised."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    knobs = [dict(low_precision="fp8"), dict(low_precision="nvfp4", modality_threshold=0.9)][dist.get_rank()]
    try:
        _load(path, DistributedConfig(tp_size=2, ep_size=2), **knobs)
        mine = {"type": None, "message": "no error"}
    except Exception as error:
        mine = {"type": type(error).__name__, "message": str(error)}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _nonfinite_rows(path: Path) -> dict:
    """One experts layer called directly under all-to-all with rank 0 lowered to fp8: finite inputs travel as fp8,
    a batch holding inf/NaN rows travels in bf16 (those rows are computed in bf16, as in one process)."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.distributed import DistributedConfig

    import realb_hf

    knobs = dict(policy="static", rank_precisions={0: "low"}, low_precision="fp8", ep_size=2)
    dc = DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all")
    layer = _load(path, dc, **knobs).model.language_model.layers[0].mlp.experts
    ref_model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=realb_hf.RealbConfig(**knobs)
    )
    ref = ref_model.model.language_model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 8, (64, 2), generator=gen)
    weights = torch.softmax(torch.randn(64, 2, generator=gen), -1).to(torch.bfloat16)
    out = {}
    with torch.no_grad():
        for name in ("finite", "nonfinite"):
            if name == "nonfinite":
                hidden[3] = float("inf")
                hidden[7, 5] = float("nan")
            got, want = layer(hidden, ids, weights), ref(hidden, ids, weights)
            same_bad = torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            good = torch.isfinite(want).all(-1)
            err = ((got[good] - want[good]).float().norm() / want[good].float().norm()).item()
            sent = [a["fp8_dispatch"] for a in layer.realb_runtime.ep.applied][-1]
            out[name] = {"rel": err, "same_nonfinite": same_bad, "fp8_dispatch": sent}
    return out


def _stall_worker(workdir: Path) -> dict | None:
    import torch
    import torch.distributed as dist
    from ep_check import replicated_tp_plan  # tests/ is the script's directory
    from transformers.distributed import DistributedConfig

    from realb_hf.ep import set_collective_timeout
    from realb_hf.tiny import qwen3_vl_image_batch

    path = workdir / "qwen3_vl_moe"
    tp_plan = replicated_tp_plan(str(path), "qwen3_vl_moe")  # no TP collectives: the EP ones come first
    dc = DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all", tp_plan=tp_plan)
    model = _load(path, dc, policy="off")
    set_collective_timeout(model, STALL_TIMEOUT_S)
    dist.barrier()
    if dist.get_rank() == 1:  # stalls: never reaches the layer's collectives
        time.sleep(STALL_TIMEOUT_S * 4)
        return None
    batch = qwen3_vl_image_batch(batch=1, config=model.config)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model(**batch.kwargs)
        return {"type": None, "message": "no error", "elapsed_s": time.perf_counter() - start}
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error), "elapsed_s": time.perf_counter() - start}


def _tp_split_worker(workdir: Path) -> dict:
    """All-to-all's direct TP row split and gather against DTensor's, for even, uneven and empty batches."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from realb_hf.ep.tp_rows import tp_gather_rows, tp_rows

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    for n in (0, 1, 3, 4, 8):
        batch = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
        mine, dtensor = tp_rows(batch, mesh, with_grad=False), tp_rows(batch, mesh, with_grad=True)
        same = torch.equal(mine, dtensor) and torch.equal(tp_gather_rows(mine * 2, n, mesh), batch * 2)
        flag = torch.tensor([0 if same else 1])
        dist.all_reduce(flag)
        result[str(n)] = int(flag.item()) == 0
    return result


def _mixed_dispatch_worker(workdir: Path) -> dict:
    """The byte all-to-all of fp8 dispatch: rank 0 lowered (fp8 rows + scales), rank 1 in the model dtype, for fp32
    rows of 62 features (66 bytes per fp8 row: padded to 68 so the fp32 pieces after it stay aligned)."""
    import torch
    import torch.distributed as dist

    from realb_hf.ep import EpState
    from realb_hf.ep.all_to_all import exchange_mixed
    from realb_hf.formats.fp8 import quantize_rowwise

    rank = dist.get_rank()
    hidden = {src: torch.randn(5, 62, generator=torch.Generator().manual_seed(src)) for src in (0, 1)}
    send_sizes, recv_sizes = [3, 2], [[3, 3], [2, 2]][rank]
    state = EpState(rank=rank, size=2, global_rank=rank, implementation="all_to_all")
    received, scale = exchange_mixed(
        hidden[rank], torch.arange(5), send_sizes, recv_sizes, [True, False], rank, dist.group.WORLD, None, state
    )
    mine = slice(0, 3) if rank == 0 else slice(3, 5)
    expected = torch.cat([hidden[0][mine], hidden[1][mine]])
    if rank == 0:
        xq, fp8_scale = quantize_rowwise(expected)
        same = torch.equal(received.contiguous(), xq.view(torch.uint8)) and torch.equal(scale, fp8_scale)
    else:
        same = scale is None and torch.equal(received, expected)
    flag = torch.tensor([0 if same else 1])
    dist.all_reduce(flag)
    return {"same": int(flag.item()) == 0, "comm": state.comm}


def _collectives_worker(workdir: Path) -> dict:
    """One all-to-all experts layer called directly, stock and ReaLB under several configs: the collectives each
    call issues (every c10d and functional-collective op the dispatcher sees), whether ReaLB checked its rows for
    fp8, and the output against stock's. On CUDA also the host syncs per call (`set_sync_debug_mode`)."""
    import warnings

    import torch
    import torch.distributed as dist
    from ep_check import replicated_tp_plan  # tests/ is the script's directory
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForImageTextToText
    from transformers.distributed import DistributedConfig

    import realb_hf.ep.all_to_all as a2a
    from realb_hf import get_runtime

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace = func.namespace
            if namespace.startswith(("c10d", "_c10d_functional")) and not any(w in func.name() for w in ("wait", "wrap")):
                self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    checked: list[bool] = []
    exchange = a2a.exchange_counts

    def spy(*args):
        checked.append(bool(args[-1]))
        return exchange(*args)

    a2a.exchange_counts = spy
    path = workdir / "qwen3_vl_moe"
    plan = replicated_tp_plan(str(path), "qwen3_vl_moe")  # no TP collectives in the dense layers
    dc = DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all", tp_plan=plan)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    stock = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, distributed_config=dc).eval()
    realb = _load(path, dc, policy="off")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 64, generator=gen).to(torch.bfloat16).to(device)
    ids = torch.randint(0, 8, (64, 2), generator=gen).to(device)
    weights = torch.softmax(torch.randn(64, 2, generator=gen), -1).to(torch.bfloat16).to(device)

    def call(model) -> dict:
        layer = model.model.language_model.layers[0].mlp.experts
        checked.clear()
        counting = Collectives()
        syncs = 0
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            with counting:
                out = layer(hidden, ids, weights)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                syncs = sum("synchroniz" in str(w.message) for w in caught)
        return {"ops": counting.ops, "syncs": syncs, "checked": list(checked), "out": out}

    want = call(stock)
    result = {"stock": {"ops": want["ops"], "syncs": want["syncs"]}}
    cases = {
        "off": dict(policy="off"),
        "nothing lowered": dict(policy="realb", low_precision="fp8", batch_threshold=10**9),
        "nvfp4 only": dict(policy="realb", low_precision="nvfp4", batch_threshold=0),
        "static bf16": dict(policy="static", rank_precisions={0: "high", 1: "high"}),
        "fp8 rank 0": dict(policy="static", rank_precisions={0: "low"}, low_precision="fp8"),
    }
    for name, knobs in cases.items():
        get_runtime(realb).reconfigure(**knobs)
        got = call(realb)
        result[name] = {
            "ops": got["ops"],
            "syncs": got["syncs"],
            "checked": got["checked"],
            "equal": torch.equal(got["out"], want["out"]),
            "rel": ((got["out"] - want["out"]).float().norm() / want["out"].float().norm()).item(),
        }
    a2a.exchange_counts = exchange
    return result


def _worker(scenario: str, workdir: str, out: str) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from realb_hf.ep import init_distributed

    rank, _, _ = init_distributed(timeout_s=120)
    workers = {
        "errors": _errors_worker,
        "stall": _stall_worker,
        "tp_split": _tp_split_worker,
        "mixed_dispatch": _mixed_dispatch_worker,
        "collectives": _collectives_worker,
    }
    result = workers[scenario](Path(workdir))
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=1))
    sys.stdout.flush()
    os._exit(0)  # a process group with a timed-out peer must not be torn down collectively


if __name__ == "__main__":
    _worker(*sys.argv[1:4])


def test_ep_log_of_device_decisions_stays_bounded():
    """A server that never reads `applied` keeps only the window it would show, not every layer call."""
    from realb_hf.ep import EpState

    state = EpState(rank=0, size=2, global_rank=0, implementation="all_reduce", max_applied=5)
    for i in range(33):
        state.log_deferred(lambda i: {"call": i}, i)
        assert len(state._pending) < 10
    assert [entry["call"] for entry in state.applied] == [28, 29, 30, 31, 32]


@pytest.mark.parametrize("raw", ["abc", "-5", "nan", "0", "inf"])
def test_a_bad_timeout_in_the_environment_names_the_variable(raw, monkeypatch):
    from realb_hf.ep import ENV_TIMEOUT
    from realb_hf.ep.groups import timeout_from_env

    monkeypatch.setenv(ENV_TIMEOUT, raw)
    with pytest.raises(ValueError, match=f"environment variable {ENV_TIMEOUT} must be a number of seconds > 0"):
        timeout_from_env()


def test_timeouts_from_the_environment_and_arguments_are_checked(monkeypatch):
    from realb_hf.ep import ENV_TIMEOUT, init_distributed
    from realb_hf.ep.groups import timeout_from_env

    monkeypatch.setenv(ENV_TIMEOUT, " 2.5 ")
    assert timeout_from_env() == 2.5
    monkeypatch.delenv(ENV_TIMEOUT)
    assert timeout_from_env() is None
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
        init_distributed(timeout_s=0)
