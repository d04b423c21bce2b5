"""Per-request ReaLB telemetry of `realb-hf serve`: which forwards each request ran, summarised when read.

transformers' server runs one model's `generate` calls one after another on one inference thread, so the forwards
a request runs are the model telemetry's forward numbers between its start and its end. A request costs two reads
of `Telemetry.forwards` and one tuple in a bounded queue; its records are built and summarised only when something
reads them (a `/metrics` scrape, or the debug log line when DEBUG logging is on), as the model's own telemetry is.

Metrics (namespace `realb`, next to `realb_hf.prometheus`'s):

| metric | type | meaning |
|---|---|---|
| realb_requests_total | counter | requests whose generation finished (on the sequential path) |
| realb_request_lowered_pair_share | histogram | per request: share of its token-expert pairs computed in low precision |
| realb_request_predicted_speedup | histogram | per request: mean predicted MoE-layer speedup of its layer records |
| realb_request_lowered_layer_records_total | counter | layer records of requests that lowered at least one rank |
| realb_requests_untracked_total | counter | requests whose records the telemetry window dropped before a scrape |
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from .extras import require
from .layer_record import LayerRecord
from .telemetry import Telemetry

logger = logging.getLogger("realb_hf.serve")

SHARE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
SPEEDUP_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0)
MAX_UNREAD = 100_000  # finished requests kept until a scrape reads them (beyond: counted as untracked)


class Span(NamedTuple):
    """One request's forwards: telemetry forward numbers in (first, last]."""

    request_id: str
    first: int
    last: int


def by_forward(records: list[LayerRecord]) -> dict[int, list[LayerRecord]]:
    found: dict[int, list[LayerRecord]] = {}
    for record in records:
        found.setdefault(record.forward, []).append(record)
    return found


def span_records(indexed: dict[int, list[LayerRecord]], span: Span) -> list[LayerRecord]:
    return [r for forward in range(span.first + 1, span.last + 1) for r in indexed.get(forward, ())]


def describe(request_id: str, summary: dict[str, Any], forwards: int) -> str:
    """The debug log line of one request: its ReaLB decision summary."""
    return (
        f"request {request_id}: {forwards} forwards, {summary['records']} MoE layer records, "
        f"{summary['layers_lowered']} with a lowered rank, "
        f"{summary['lowered_token_fraction'] * 100:.1f}% of token-expert pairs in low precision, "
        f"balancedness {summary['balancedness_cost_before']:.3f} -> {summary['balancedness_cost_after']:.3f}, "
        f"mean predicted layer speedup {summary['predicted_speedup']:.2f}x"
    )


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        return [(repr(float(b)), c) for b, c in zip(self.bounds, self.counts)] + [("+Inf", self.total)]


class RequestTelemetry:
    """Tracks the forwards of each request of one model and turns them into per-request numbers when read.

    `track(fn, request_id)` wraps a call that the inference thread runs; calls of one model must not overlap
    (transformers' sequential generation guarantees it), or their forwards would be attributed to both."""

    def __init__(self, telemetry: Telemetry, namespace: str = "realb"):
        self.telemetry = telemetry
        self.namespace = namespace
        self._lock = threading.Lock()
        self._unread: deque[Span] = deque()
        self.requests = 0
        self.untracked = 0
        self.lowered_layer_records = 0
        self.share = _Histogram(SHARE_BUCKETS)
        self.speedup = _Histogram(SPEEDUP_BUCKETS)
        telemetry.reset_hooks.append(lambda _t: self.ingest())  # forward numbers restart at a reset

    def track(self, fn: Callable, request_id: str) -> Callable:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            first = self.telemetry.forwards
            try:
                return fn(*args, **kwargs)
            finally:
                self.finish(Span(request_id, first, self.telemetry.forwards))

        return tracked

    def finish(self, span: Span) -> None:
        with self._lock:
            self.requests += 1
            if len(self._unread) >= MAX_UNREAD:
                self._unread.popleft()
                self.untracked += 1
            self._unread.append(span)
        if logger.isEnabledFor(logging.DEBUG):  # builds this request's records now: paid only with DEBUG on
            records = span_records(by_forward(self.telemetry.records), span)
            logger.debug(describe(span.request_id, self.telemetry.summary(records), span.last - span.first))

    def ingest(self) -> None:
        """Summarise every finished request not read yet (a scrape, or just before the telemetry resets)."""
        with self._lock:
            unread, self._unread = self._unread, deque()
        if not unread:
            return
        records = self.telemetry.records
        oldest = records[0].forward if records else self.telemetry.forwards + 1
        indexed = by_forward(records)
        with self._lock:
            for span in unread:
                if span.first + 1 < oldest and span.last > span.first:  # its first forwards were dropped
                    self.untracked += 1
                    continue
                mine = span_records(indexed, span)
                summary = self.telemetry.summary(mine)
                self.share.observe(summary["lowered_token_fraction"])
                self.speedup.observe(summary["predicted_speedup"])
                self.lowered_layer_records += summary["layers_lowered"]

    def collect(self):
        """prometheus_client collector protocol."""
        core = require("prometheus_client.core", "serve")
        self.ingest()
        ns = self.namespace
        with self._lock:
            requests = core.CounterMetricFamily(f"{ns}_requests", "Requests whose generation finished.")
            requests.add_metric([], self.requests)
            untracked = core.CounterMetricFamily(
                f"{ns}_requests_untracked", "Requests whose records the telemetry window dropped before a scrape."
            )
            untracked.add_metric([], self.untracked)
            lowered = core.CounterMetricFamily(
                f"{ns}_request_lowered_layer_records", "Layer records with a lowered rank, of tracked requests."
            )
            lowered.add_metric([], self.lowered_layer_records)
            share = core.HistogramMetricFamily(
                f"{ns}_request_lowered_pair_share", "Per request: share of token-expert pairs in low precision."
            )
            share.add_metric([], self.share.cumulative(), sum_value=self.share.sum)
            speedup = core.HistogramMetricFamily(
                f"{ns}_request_predicted_speedup", "Per request: mean predicted MoE-layer speedup (cost model)."
            )
            speedup.add_metric([], self.speedup.cumulative(), sum_value=self.speedup.sum)
        yield from (requests, untracked, lowered, share, speedup)


__all__ = ["RequestTelemetry", "Span", "by_forward", "describe", "span_records"]
