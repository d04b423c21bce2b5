"""The `realb-hf` command line: the README's default run, bad options, forwarding to the benchmarks."""

import json

import pytest

from realb_hf.cli import main


def test_run_prints_the_per_layer_report(capsys, tmp_path):
    out = tmp_path / "telemetry.json"
    assert (
        main(["run", "--num-experts", "8", "--batch", "4", "--grid", "8", "--batch-threshold", "0", "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "model.language_model.layers.0.mlp.experts" in text and "r3:" in text and "summary:" in text
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 and all(len(r["tokens_per_rank"]) == 4 for r in records)


def test_run_reports_bad_options_without_a_traceback(capsys):
    assert main(["run", "--num-experts", "8", "--ep-size", "3"]) == 2
    assert "ep_size=3 must divide the number of experts (8)" in capsys.readouterr().err


def test_bench_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "layer" in capsys.readouterr().out
