"""The premise test's plumbing: which rows `RowLowering` lowers, that the split output is exact, and the report."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from realb_hf import RealbConfig, accuracy, apply_realb, bundled
from realb_hf.accuracy_report import to_markdown
from realb_hf.bootstrap import describe
from realb_hf.experts import RealbExperts, host_path
from realb_hf.premise import STRATEGIES, RowLowering, pool, run_premise

N = 8


@pytest.fixture(scope="module")
def loaded():
    path = bundled.bundled_model_dir()
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).eval()
    examples = accuracy.order_for_batching(accuracy.load_tasks().heldout_set(N, seed=0), "mixed")
    base = accuracy.evaluate(model, processor, examples, accuracy.EvalConfig("bf16", None), batch_size=N)
    apply_realb(model, RealbConfig(ep_size=4, policy="off"))
    return model, processor, examples, base


batch = accuracy.batch_inputs  # one forward's inputs, as the accuracy table builds them


def test_pools():
    codes = torch.tensor([0, 1, 1, 0, 0], dtype=torch.int8)
    real = torch.tensor([False, True, True, True, True])
    assert pool("vision", codes, real).tolist() == [1, 2]
    assert pool("text", codes, real).tolist() == [3, 4]  # padding (row 0) is never lowered
    assert pool("random", codes, real).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="choose one of"):
        pool("audio", codes, real)


def test_share_zero_changes_nothing_and_counts_real_pairs(loaded):
    model, processor, examples, base = loaded
    with RowLowering(model, "random", 0.0, "nvfp4") as lowering:
        result = accuracy.evaluate(model, processor, examples, accuracy.EvalConfig("x", None), batch_size=N)
    assert result.answers == base.answers and result.question_nll == base.question_nll
    inputs = batch(processor, examples)
    layers = model.config.text_config.num_hidden_layers
    top_k = model.config.text_config.num_experts_per_tok
    assert lowering.stats.calls == layers  # the prefill forward only: decode steps are not lowered
    assert lowering.stats.real_pairs == int(inputs["attention_mask"].sum()) * top_k * layers
    assert lowering.stats.lowered_pairs == 0


def test_the_policy_and_forward_come_back_after_the_block(loaded):
    model = loaded[0]
    experts = next(m for m in model.modules() if isinstance(m, RealbExperts))
    model.realb.reconfigure(policy="all_low")
    try:
        with RowLowering(model, "text", 0.1, "fp8"):
            assert model.realb.settings.config.policy == "off" and "forward" in vars(experts)
        assert model.realb.settings.config.policy == "all_low" and "forward" not in vars(experts)
    finally:
        model.realb.reconfigure(policy="off")


@pytest.mark.parametrize("strategy", ["vision", "text", "random"])
def test_rows_come_from_the_pool_and_the_split_is_exact(loaded, strategy):
    model, processor, examples, _ = loaded
    inputs = batch(processor, examples)
    codes = (inputs["input_ids"] == model.config.image_token_id).reshape(-1)
    real = inputs["attention_mask"].reshape(-1).bool()
    experts = [m for m in model.modules() if isinstance(m, RealbExperts)][-1]  # `last_lowered` is its call
    seen = {}
    hook = experts.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with RowLowering(model, strategy, 0.2, "fp8", seed=1) as lowering, torch.no_grad():
        model(**inputs)
    hook.remove()
    lowered = lowering.last_lowered
    assert int(lowered.sum()) == round(0.2 * int(real.sum()))
    assert real[lowered].all()
    if strategy == "vision":
        assert codes[lowered].all()
    if strategy == "text":
        assert not codes[lowered].any()
    hidden, index, weights = seen["args"]
    with torch.no_grad():
        stock = type(experts).forward(experts, hidden, index, weights)  # policy off: the stock computation
        low = host_path.run(experts, hidden, index, weights, ("fp8",) * experts.num_experts, "bf16")
    out = seen["out"]
    # fp8 scales each row on its own, so a lowered row is what all-fp8 experts give it
    assert torch.equal(out[lowered], low[lowered])
    assert torch.equal(out[~lowered & real], stock[~lowered & real])


def test_a_share_the_pool_cannot_supply_is_refused(loaded):
    model, processor, examples, _ = loaded
    text_only = [ex for ex in examples if ex.modality == "text"]
    with RowLowering(model, "vision", 0.1, "nvfp4"), pytest.raises(ValueError, match="'vision' pool, which holds 0"):
        accuracy.evaluate(model, processor, text_only, accuracy.EvalConfig("x", None), batch_size=N)


def test_bad_arguments_are_named(loaded):
    model = loaded[0]
    with pytest.raises(ValueError, match="strategy='audio'"):
        RowLowering(model, "audio", 0.1, "nvfp4")
    with pytest.raises(ValueError, match=r"share must lie in \[0, 1\]"):
        RowLowering(model, "vision", 1.5, "nvfp4")
    with pytest.raises(ValueError, match="low='int3'"):
        RowLowering(model, "vision", 0.1, "int3")
    stock = torch.nn.Linear(2, 2)
    stock.config = model.config
    with pytest.raises(ValueError, match="apply_realb"):
        RowLowering(stock, "vision", 0.1, "nvfp4")


def test_run_premise_reports_equal_shares_with_intervals(loaded):
    model, processor, examples, base = loaded

    def score(name):
        return accuracy.evaluate(model, processor, examples, accuracy.EvalConfig(name, None), batch_size=N)

    premise = run_premise(model, score, examples, base, shares=(0.1,), low="nvfp4", n_resamples=200)
    shares = [row["lowered_share"] for row in premise["rows"]]
    assert [row["strategy"] for row in premise["rows"]] == ["vision", "text", "random"]
    assert max(shares) - min(shares) < 1e-9 and shares[0] == pytest.approx(0.1, abs=0.01)
    for row in premise["rows"]:
        assert set(row["vs_bf16"]) == {"overall", "image", "text"}
        assert row["vs_bf16"]["overall"]["answer_nll"]["n"] == N
    (head,) = premise["vision_vs_text"]
    assert head["share"] == 0.1 and "verdict" in head["vision_minus_text"]["overall"]["answer_nll"]
    report = {
        "machine": "test", "model": "demo/model", "moe_layers": 4, "num_experts": 8, "top_k": 2, "n": N,
        "held_out_seed": 0, "counts": {"image": 8, "text": 8}, "ep_size": 4, "batch_threshold": 2048,
        "batch_size": N, "runs": [], "premise": [premise],
    }  # fmt: skip
    text = to_markdown(report, "cmd", "2026-12-04")
    assert "## Premise test: vision rows vs text rows" in text
    assert "| vision (nvfp4) | 10% |" in text and "Share 0.1, nvfp4:" in text


def test_cli_refuses_bad_premise_arguments(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--premise", "0"])
    assert "--premise: shares must lie in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--premise", "0.2", "--premise-low", "int3"])
    assert "--premise-low 'int3'" in capsys.readouterr().err


def test_accuracy_run_gives_every_row_intervals_and_runs_the_premise():
    configs = [accuracy.EvalConfig("bf16 (stock, no ReaLB)", None), accuracy.EvalConfig("fp8 everywhere", {
        "policy": "all_low", "low_precision": "fp8", "batch_threshold": 2048})]  # fmt: skip
    report = accuracy.run(
        bundled.bundled_model_dir(), n=N, batch_size=N, configs=configs, progress=False, batchings=("mixed",),
        n_resamples=100, premise_shares=(0.1,), premise_low=("mxfp4",),
    )  # fmt: skip
    base, low = report["runs"][0]["results"]
    assert base["vs_bf16"]["overall"]["exact_match"] == {
        "diff": 0.0, "low": 0.0, "high": 0.0, "confidence": 0.95, "n": N, "verdict": "no measurable difference"
    }  # fmt: skip
    assert low["vs_bf16"]["text"]["answer_nll"]["n"] == report["counts"]["text"]
    assert report["bootstrap"] == {"n_resamples": 100, "seed": 0, "confidence": 0.95}
    assert [row["low"] for row in report["premise"][0]["rows"]] == ["mxfp4"] * 3
    text = to_markdown(report, "cmd", "2026-12-04")
    assert "Δ overall vs bf16 [95% CI]" in text and "+0.0 [+0.0, +0.0]" in text and "(mxfp4)" in text
    verdict = low["vs_bf16"]["overall"]["exact_match"]["verdict"]
    assert f"baselines): fp8 {describe(low['vs_bf16']['overall']['exact_match'], scale=100)} points, {verdict}." in text


def test_cli_runs_the_premise_test_alone(tmp_path, capsys):
    """`--batching` with no value and `--premise`: no accuracy table, only the premise test, written as usual."""
    out = tmp_path / "premise.md"
    argv = ["--n", "8", "--batch-size", "8", "--bootstrap", "20", "--batching", "--premise", "0.1"]
    assert accuracy.main([*argv, "--premise-low", "mxfp4", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["runs"] == [] and [row["strategy"] for row in report["premise"][0]["rows"]] == list(STRATEGIES)
    assert "| vision (mxfp4) | 10% |" in out.read_text()
    with pytest.raises(SystemExit):
        accuracy.main(["--batching"])
    assert "none only with --premise" in capsys.readouterr().err


def test_a_share_no_forward_can_give_fails_before_the_table(monkeypatch):
    """Mixed batches hold fewer vision than real tokens, so share 1.0 cannot come from vision rows alone: refused
    with the share that fits, before a single row is scored."""

    def no_scoring(*args, **kwargs):
        raise AssertionError("a row was scored before the premise shares were checked")

    monkeypatch.setattr(accuracy, "evaluate", no_scoring)
    with pytest.raises(ValueError, match=r"premise test: share 1.0 needs \d+ of \d+ real tokens from the 'vision' "
                       r"pool, which holds \d+ in forward 0 \(at most 0\.\d+ fits\)"):  # fmt: skip
        accuracy.run(bundled.bundled_model_dir(), n=N, batch_size=N, progress=False, premise_shares=(1.0,))
