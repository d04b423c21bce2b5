"""`realb-hf serve`: transformers' own OpenAI-compatible server (`transformers serve`) of one ReaLB model.

transformers' `ModelManager` loads the model; its quantization hook hands `from_pretrained` a `RealbConfig`, so the
model runs with ReaLB (a model saved with ReaLB keeps its saved settings except the ones given). transformers'
handlers serve `/v1/chat/completions` (images as `image_url`, `data:` URIs included), `/v1/completions`,
`/v1/responses` and `/health`. This module adds what a ReaLB server needs on top:

- the model is pinned: `/load_model` is refused unless `allow_model_loading`, `/reset` (which would unload it)
  always, and `/v1/models` lists the served model;
- `/metrics` on the same port: `realb_hf.prometheus`'s series plus per-request ones (`realb_hf.serve_telemetry`);
- continuous batching where transformers supports the model (text-only models), said at start-up otherwise.
"""

from __future__ import annotations

import copy
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .extras import require

if TYPE_CHECKING:
    from .serve_telemetry import RequestTelemetry

logger = logging.getLogger("realb_hf.serve")

EXTRA = "serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _serving():
    """transformers' serving package, or ImportError naming the extra that installs what it needs."""
    for module in ("fastapi", "uvicorn", "pydantic", "openai", "prometheus_client"):
        require(module, EXTRA)
    from transformers.cli import serving

    return serving


@dataclass
class Served:
    """A built server: the FastAPI app and what it serves."""

    app: Any
    model_id: str  # the name clients may put in `model` (the MODEL argument as given)
    model: Any
    processor: Any
    continuous_batching: bool  # whether requests of this model run in transformers' continuous batching
    requests: RequestTelemetry
    startup_notes: list[str]


def check_address(host: str, port: int) -> None:
    """ValueError naming --host/--port unless this process can listen there (checked before the model loads)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def continuous_batching_note(model, modality, supported: bool) -> str:
    """What `--continuous-batching` does for this model, said once at start-up."""
    name = type(model).__name__
    if supported:
        return (
            f"continuous batching on: {name} requests share forwards (mixed prefill and decode batches); ReaLB "
            "decides per batch, and its telemetry records those batches (not per request)"
        )
    return (
        f"continuous batching is not available for {name} ({modality.value} model: transformers' continuous "
        "batching serves text-only models); requests run one after another with model.generate"
    )


def build_server(
    source: str,
    realb_config,
    device: str = "auto",
    allow_model_loading: bool = False,
    continuous_batching: bool = False,
) -> Served:
    """Load `source` with ReaLB through transformers' `ModelManager` and build transformers' app around it."""
    serving = _serving()
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerateManager, GenerationState

    import realb_hf

    from .serve_telemetry import RequestTelemetry

    class RealbModelManager(serving.ModelManager):
        """transformers' model manager; every model it loads gets `realb_config` (its quantization hook)."""

        def get_quantization_config(self):
            return copy.deepcopy(realb_config)

    class TrackedGenerateManager(GenerateManager):
        """transformers' sequential generation; each call on the inference thread records its forwards."""

        def __init__(self, requests: RequestTelemetry):
            super().__init__()
            self.requests = requests
            self.request_id = ""

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            self.request_id = request_id  # read by `submit`, called before this returns (one event loop)
            return super().generate_streaming(model, processor, inputs, gen_config, request_id, response_parser)

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            self.request_id = request_id  # read by `async_submit`, called before the first await
            return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)

        def submit(self, fn, *args, **kwargs):
            return super().submit(self.requests.track(fn, self.request_id), *args, **kwargs)

        def async_submit(self, fn, *args, **kwargs):
            return super().async_submit(self.requests.track(fn, self.request_id), *args, **kwargs)

    class RealbGenerationState(GenerationState):
        """transformers' generation state; the served model's sequential requests are tracked."""

        def __init__(self, model_key: str, requests: RequestTelemetry, **kwargs):
            super().__init__(**kwargs)
            self.model_key = model_key
            self.tracked = TrackedGenerateManager(requests)

        def get_manager(self, model_id: str, use_cb: bool = False):
            if model_id == self.model_key and not use_cb:
                return self.tracked
            return super().get_manager(model_id, use_cb=use_cb)

    manager = RealbModelManager(device=device, continuous_batching=continuous_batching, force_model=source)
    key = manager.process_model_name(source)
    model, processor = manager.load_model_and_processor(key)
    if not realb_hf.get_runtime(model).layers:  # get_runtime raises when ReaLB was not applied at all
        raise ValueError(f"{source} has no MoE experts layer ReaLB converts; serve it with `transformers serve`")
    requests = RequestTelemetry(realb_hf.get_telemetry(model))
    state = RealbGenerationState(key, requests, continuous_batching=continuous_batching)
    modality = manager.get_model_modality(model, processor=processor)
    use_cb = state.use_continuous_batching(model, modality) if continuous_batching else False
    notes = [continuous_batching_note(model, modality, use_cb)] if continuous_batching else []
    if allow_model_loading:
        manager.force_model = None  # requests name their model; the served one stays loaded
        notes.append(
            "--allow-model-loading: clients may load other models (/load_model), each with these ReaLB settings"
        )

    handler = dict(model_manager=manager, generation_state=state)
    app = serving.build_server(
        manager,
        ChatCompletionHandler(**handler),
        completion_handler=CompletionHandler(**handler),
        response_handler=ResponseHandler(**handler),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(**handler),
        generation_state=state,
    )
    _pin(app, source, key, allow_model_loading)
    _add_metrics(app, model, requests)
    return Served(app, source, model, processor, use_cb, requests, notes)


def _pin(app, source: str, key: str, allow_model_loading: bool) -> None:
    """Replace transformers' model-management routes: the served model cannot be swapped or unloaded."""
    from fastapi.responses import JSONResponse

    replaced = {"/reset", "/v1/models"} | (set() if allow_model_loading else {"/load_model"})
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]

    def refuse(route: str, why: str):
        def refused():
            return JSONResponse({"error": f"{route} is refused: this server is pinned to {source}; {why}"}, 403)

        app.add_api_route(route, refused, methods=["POST"])

    if not allow_model_loading:
        refuse("/load_model", "start it with --allow-model-loading to let clients load other models")
    refuse("/reset", "it would unload the served model")

    def list_models():
        return {"object": "list", "data": [{"id": source, "object": "model", "owned_by": "realb_hf", "root": key}]}

    app.add_api_route("/v1/models", list_models, methods=["GET"])


def _add_metrics(app, model, requests: RequestTelemetry) -> None:
    """`/metrics` on the app's own port: the model's ReaLB series and the per-request ones."""
    client = require("prometheus_client", EXTRA)
    from fastapi.responses import Response

    from .prometheus import register_model

    registry = client.CollectorRegistry()
    register_model(model, registry)
    registry.register(requests)

    def metrics():  # a plain function: FastAPI runs it off the event loop (it reads the telemetry)
        return Response(client.generate_latest(registry), media_type=client.CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"])


def run(served: Served, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn, as `transformers serve` runs it)."""
    import uvicorn

    for note in served.startup_notes:
        logger.warning(note)
    uvicorn.run(served.app, host=host, port=port, log_level=log_level)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "EXTRA",
    "Served",
    "build_server",
    "check_address",
    "continuous_batching_note",
    "run",
]
