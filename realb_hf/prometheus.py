"""ReaLB telemetry as Prometheus metrics, for the monitoring a serving fleet already runs.

Part of the package (not only of `integrations/`) because `realb-hf serve` exports these series at `/metrics`;
`integrations.prometheus` re-exports it for checkouts.

    from realb_hf.prometheus import serve_metrics     # or: from integrations.prometheus import serve_metrics
    server = serve_metrics(model, port=9464)          # http://127.0.0.1:9464/metrics

Metrics (namespace `realb`, label `layer` is the experts module's name, `rank` the EP rank):

| metric | type | meaning |
|---|---|---|
| realb_forwards_total | counter | model forwards seen |
| realb_layer_records_total{layer} | counter | MoE layer executions recorded |
| realb_token_pairs_total{layer} | counter | token-expert pairs routed |
| realb_lowered_token_pairs_total{layer} | counter | of those, computed in low precision |
| realb_precision_switches_total{layer,rank} | counter | times a rank's precision changed between consecutive records |
| realb_dropped_records_total | counter | records the telemetry window (`max_records`) dropped before they were read |
| realb_rank_tokens{layer,rank} | gauge | token-expert pairs of the rank in the latest record |
| realb_rank_vision_share{layer,rank} | gauge | vision share of the rank's load in the latest record |
| realb_rank_low_precision{layer,rank} | gauge | 1 if the rank ran (partly) in low precision in the latest record |
| realb_balancedness_tokens{layer} | gauge | mean/max rank load (tokens), latest record |
| realb_balancedness_cost_before{layer} / _after{layer} | gauge | mean/max predicted rank time, all high / as decided |
| realb_predicted_speedup{layer} | gauge | slowest rank before / after the decision, latest record |
| realb_persistent_cache_bytes | gauge | bytes of persistent low-precision weight copies |

The lowered-token fraction is `rate(realb_lowered_token_pairs_total[5m]) / rate(realb_token_pairs_total[5m])`.
Records are read at scrape time, so a scrape costs nothing on the serving path.

Counters are monotonic and exact across `telemetry.reset()` whatever the scrape timing: the collector reads every
record that is still unread just before the reset clears them (a server that resets per request pays for building
those records then, instead of at the next scrape). Records are lost to the counters only when more than
`Telemetry.max_records` layer calls happen between two scrapes; `realb_dropped_records_total` counts them.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from .extras import require

EXTRA = "prometheus"


class RealbCollector:
    """A prometheus_client collector over one model's `realb_hf.Telemetry` (records ingested at scrape time)."""

    def __init__(self, telemetry, namespace: str = "realb"):
        self.telemetry = telemetry
        self.namespace = namespace
        self._lock = threading.Lock()  # scrapes run on the HTTP server's thread, resets on the serving thread
        self._seen = 0  # records of the current telemetry window ingested or dropped, since the last reset
        self._forwards_before = 0  # forwards counted by the telemetry before its resets
        self._last_forwards = 0
        self._dropped = 0
        self._records = defaultdict(int)
        self._pairs = defaultdict(int)
        self._lowered = defaultdict(float)
        self._switches = defaultdict(int)
        self._last: dict[str, Any] = {}
        self._ingest_before_reset()

    def _ingest_before_reset(self) -> None:
        """Count every unread record when the telemetry resets (its `reset_hooks`), whoever resets it."""

        def before_reset(telemetry) -> None:
            with self._lock:
                self._ingest()
                self._forwards_before += telemetry.forwards
                self._seen = self._last_forwards = 0

        self.telemetry.reset_hooks.append(before_reset)

    def _ingest(self) -> None:
        """Count the records added since the last call (caller holds the lock)."""
        self._last_forwards = self.telemetry.forwards
        records = self.telemetry.records
        total = self.telemetry.dropped + len(records)  # records this window has ever held
        unread = total - self._seen
        self._dropped += max(0, unread - len(records))
        for r in records[max(0, len(records) - unread) :]:
            pairs = sum(r.tokens_per_rank)
            self._records[r.layer] += 1
            self._pairs[r.layer] += pairs
            self._lowered[r.layer] += r.lowered_fraction * pairs
            previous = self._last.get(r.layer)
            if previous is not None:
                for rank, (old, cur) in enumerate(zip(previous.precision_per_rank, r.precision_per_rank)):
                    if old != cur:
                        self._switches[(r.layer, str(rank))] += 1
            self._last[r.layer] = r
        self._seen = total

    def collect(self):
        core = require("prometheus_client.core", EXTRA)
        with self._lock:  # built whole under the lock: a reset never lands between two families
            self._ingest()
            families = list(self._families(core))
        yield from families

    def _families(self, core):
        ns = self.namespace

        def family(kind, name, doc, labels=()):
            cls = core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily
            return cls(f"{ns}_{name}", doc, labels=list(labels))

        forwards = family("counter", "forwards", "Model forwards seen by ReaLB.")
        forwards.add_metric([], self._forwards_before + self._last_forwards)
        yield forwards
        dropped = family("counter", "dropped_records", "Records the window dropped before a scrape read them.")
        dropped.add_metric([], self._dropped)
        yield dropped
        for name, doc, values in (
            ("layer_records", "MoE layer executions recorded.", self._records),
            ("token_pairs", "Token-expert pairs routed.", self._pairs),
            ("lowered_token_pairs", "Token-expert pairs computed in low precision.", self._lowered),
        ):
            metric = family("counter", name, doc, ["layer"])
            for layer, value in sorted(values.items()):
                metric.add_metric([layer], value)
            yield metric
        switches = family("counter", "precision_switches", "Precision changes of a rank between records.", ["layer", "rank"])
        for (layer, rank), value in sorted(self._switches.items()):
            switches.add_metric([layer, rank], value)
        yield switches

        per_rank = {
            "rank_tokens": ("Token-expert pairs of the rank, latest record.", lambda r: r.tokens_per_rank),
            "rank_vision_share": ("Vision share of the rank's load, latest record.", lambda r: r.vision_share_per_rank),
            "rank_low_precision": (
                "1 if the rank ran (partly) in low precision in the latest record.",
                lambda r: [0.0 if p in ("bf16",) else 1.0 for p in r.precision_per_rank],
            ),
        }
        for name, (doc, values_of) in per_rank.items():
            metric = family("gauge", name, doc, ["layer", "rank"])
            for layer, record in sorted(self._last.items()):
                for rank, value in enumerate(values_of(record)):
                    metric.add_metric([layer, str(rank)], value)
            yield metric
        for name, doc in (
            ("balancedness_tokens", "mean/max rank load in tokens, latest record."),
            ("balancedness_cost_before", "mean/max predicted rank time with every rank high, latest record."),
            ("balancedness_cost_after", "mean/max predicted rank time as decided, latest record."),
            ("predicted_speedup", "Slowest rank before / after the decision, latest record."),
        ):
            metric = family("gauge", name, doc, ["layer"])
            for layer, record in sorted(self._last.items()):
                metric.add_metric([layer], getattr(record, name))
            yield metric
        cache = family("gauge", "persistent_cache_bytes", "Bytes of persistent low-precision weight copies.")
        cache.add_metric([], self.telemetry.extra_memory_bytes)
        yield cache


def register_model(model, registry=None, namespace: str = "realb") -> RealbCollector:
    """Register a collector for `model`'s ReaLB telemetry (default: prometheus_client's global registry)."""
    import realb_hf

    client = require("prometheus_client", EXTRA)
    collector = RealbCollector(realb_hf.get_telemetry(model), namespace)
    (registry if registry is not None else client.REGISTRY).register(collector)
    return collector


def serve_metrics(model, port: int = 9464, addr: str = "127.0.0.1", registry=None):
    """Register `model` and serve /metrics over HTTP on `addr:port`; returns (server, thread)."""
    client = require("prometheus_client", EXTRA)
    registry = registry if registry is not None else client.CollectorRegistry()
    register_model(model, registry)
    return client.start_http_server(port, addr=addr, registry=registry)
