"""The Prometheus exporter, scraped over HTTP on localhost."""

import socket
import urllib.request

import pytest
import torch
from conftest import load_qwen

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from integrations.prometheus import serve_metrics  # noqa: E402


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


def test_missing_extra_names_it(monkeypatch):
    import builtins

    from integrations._extras import require

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("not_installed_pkg"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'realb_hf\[prometheus\]'"):
        require("not_installed_pkg", "prometheus")
