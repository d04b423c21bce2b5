"""The Prometheus exporter, scraped over HTTP on localhost."""

import socket
import urllib.request

import pytest
import torch
from conftest import load_qwen

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from integrations.prometheus import serve_metrics  # noqa: E402  (re-exports realb_hf.prometheus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_scrape_reports_telemetry(qwen_dir, qwen_batch):
    model = load_qwen(qwen_dir, policy="static", ep_size=2, rank_precisions={1: "low"}, low_precision="fp8")
    port = free_port()
    server, thread = serve_metrics(model, port=port)
    try:
        with torch.no_grad():
            model(**qwen_batch.kwargs)
        first = scrape(port)
        layer = "model.language_model.layers.0.mlp.experts"
        assert first[("realb_forwards_total", ())] == 1
        assert first[("realb_layer_records_total", (("layer", layer),))] == 1
        pairs = first[("realb_token_pairs_total", (("layer", layer),))]
        assert pairs == qwen_batch.kwargs["input_ids"].numel() * 2
        lowered = first[("realb_lowered_token_pairs_total", (("layer", layer),))]
        rank1 = first[("realb_rank_tokens", (("layer", layer), ("rank", "1")))]
        assert lowered == pytest.approx(rank1)
        assert first[("realb_rank_low_precision", (("layer", layer), ("rank", "0")))] == 0
        assert first[("realb_rank_low_precision", (("layer", layer), ("rank", "1")))] == 1
        assert 0 < first[("realb_balancedness_tokens", (("layer", layer),))] <= 1

        realb_runtime = model.realb
        realb_runtime.reconfigure(policy="off")
        with torch.no_grad():
            model(**qwen_batch.kwargs)
        second = scrape(port)
        assert second[("realb_token_pairs_total", (("layer", layer),))] == 2 * pairs
        assert second[("realb_lowered_token_pairs_total", (("layer", layer),))] == pytest.approx(lowered)
        assert second[("realb_precision_switches_total", (("layer", layer), ("rank", "1")))] == 1
        assert second[("realb_rank_low_precision", (("layer", layer), ("rank", "1")))] == 0
    finally:
        server.shutdown()


def counters(sample: dict, layers: list[str]) -> dict:
    """The exporter's counters, summed over layers."""
    def total(name):
        return sum(sample.get((name, (("layer", layer),)), 0) for layer in layers)

    return {
        "forwards": sample[("realb_forwards_total", ())],
        "records": total("realb_layer_records_total"),
        "pairs": total("realb_token_pairs_total"),
        "lowered": total("realb_lowered_token_pairs_total"),
        "dropped": sample[("realb_dropped_records_total", ())],
    }


def test_counters_stay_exact_across_resets(qwen_dir, qwen_batch):
    """Ten forwards, a scrape, reset(), fifteen forwards: the totals count all 25 forwards, whenever the scrapes
    happen (also with resets between scrapes, and with none at all before the first reset)."""
    model = load_qwen(qwen_dir, policy="static", ep_size=2, rank_precisions={1: "low"}, low_precision="fp8")
    telemetry = model.realb.telemetry
    port = free_port()
    server, thread = serve_metrics(model, port=port)

    def forwards(n):
        with torch.no_grad():
            for _ in range(n):
                model(**qwen_batch.kwargs)

    try:
        forwards(1)
        one = telemetry.summary()
        layers = sorted({r.layer for r in telemetry.records})
        per_forward = {"records": len(layers), "pairs": sum(sum(r.tokens_per_rank) for r in telemetry.records)}
        per_forward["lowered"] = one["lowered_token_fraction"] * per_forward["pairs"]
        assert len(layers) == 2 and per_forward["lowered"] > 0
        forwards(9)
        first = counters(scrape(port), layers)
        telemetry.reset()
        forwards(15)
        second = counters(scrape(port), layers)
        assert first["forwards"] == 10 and second["forwards"] == 25
        for key in ("records", "pairs"):
            assert first[key] == 10 * per_forward[key] and second[key] == 25 * per_forward[key]
        assert second["lowered"] == pytest.approx(25 * per_forward["lowered"])

        # resets with no scrape in between: nothing recorded before them is lost
        telemetry.reset()
        forwards(3)
        telemetry.reset()
        telemetry.reset()
        forwards(2)
        third = counters(scrape(port), layers)
        assert third["forwards"] == 30 and third["records"] == 30 * per_forward["records"]
        assert third["pairs"] == 30 * per_forward["pairs"] and third["dropped"] == 0
    finally:
        server.shutdown()


def test_records_the_window_dropped_before_a_scrape_are_counted_as_dropped(qwen_dir, qwen_batch):
    model = load_qwen(qwen_dir, policy="off", ep_size=2)
    telemetry = model.realb.telemetry
    telemetry.max_records = 3
    port = free_port()
    server, thread = serve_metrics(model, port=port)
    try:
        with torch.no_grad():
            for _ in range(5):  # 10 layer records, 3 kept
                model(**qwen_batch.kwargs)
        layers = sorted({r.layer for r in telemetry.records})
        sample = counters(scrape(port), layers)
        assert sample["forwards"] == 5 and sample["records"] == 3 and sample["dropped"] == 7
    finally:
        server.shutdown()


def test_missing_extra_names_it(monkeypatch):
    import builtins

    from realb_hf.extras import require

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("not_installed_pkg"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'realb_hf\[prometheus\]'"):
        require("not_installed_pkg", "prometheus")
