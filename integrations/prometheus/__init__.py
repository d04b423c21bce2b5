"""ReaLB telemetry as Prometheus metrics: `realb_hf.prometheus` (the metrics table is in its docstring), under the
import path the integrations use."""

from realb_hf.prometheus import EXTRA, RealbCollector, register_model, serve_metrics

__all__ = ["EXTRA", "RealbCollector", "register_model", "serve_metrics"]
