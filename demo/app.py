"""Gradio demo of realb_hf: chat with a multimodal MoE model and watch ReaLB pick a precision per layer and rank.

    realb-hf demo                      # or: python -m demo.app   (serves http://127.0.0.1:7860)
    realb-hf demo --model Qwen/Qwen3-VL-30B-A3B-Instruct --device cuda

The default model is the tiny Qwen3-VL-MoE trained on `demo/tasks.py` that ships in `demo/model/`. The page
serves that model (or `--model`) only, unless the operator allows other folders or Hub ids with `--allow-model`
(demo/models.py decides what a client may load). Each request can be replicated
N times in one forward ("batch of N copies") so that a CPU run crosses ReaLB's batch threshold; the answer shown is
row 0's. After every answer the panels show, for the prefill forward, the token load of each (virtual) EP rank per
MoE layer, the precision each rank ran at, balancedness before/after and the predicted layer speedup.

This file builds and serves the page. What does not need a browser is plain functions in files of their own, tested
in tests/test_demo.py: the controls' settings (settings.py), upload checks and N-copy batching (inputs.py), the
request engine (request.py), the panels (panels.py), which models a client may load (models.py).
tests/test_browser.py drives the page in Chromium.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .examples import QUESTION_FORMS, example_messages, forms_markdown
from .inputs import MAX_UPLOAD_BYTES, UploadError, parse_message
from .models import (
    BUNDLED_MODEL,
    ModelAllowlist,
    ModelLoadError,
    ModelStore,
    display_name,
    ep_size_choices,
    resolve_model,
)
from .panels import RequestResult, balance_html, heatmap_html, precision_html, render_panels, summary_markdown
from .request import MAX_PROMPT_TOKENS, run_request
from .settings import DEMO_POLICIES, MAX_COPIES, DemoSettings

# Gradio phones home (analytics, version check) unless told not to; this demo must run offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

logger = logging.getLogger("realb_hf.demo")

# What the server keeps between requests. Gradio holds, per browser session, the last value of every output (the
# chat history and the panels' HTML with the heatmap PNG) for `state_session_capacity` sessions, 10000 by default;
# every page load and API client is a session. Both bounds below keep that memory flat.
MAX_CHAT_MESSAGES = 40  # the chat shows the last 40 messages; every question is answered on its own anyway
MAX_SESSIONS = 64  # sessions whose state gradio keeps; an evicted one keeps working, its state is rebuilt
EXAMPLE_FOLDER = Path(tempfile.gettempdir()) / "realb-demo-examples"  # the examples' images, written at start-up


def model_status_text(store: ModelStore) -> str:
    """The model status line: what is loaded now (the store is shared by every tab), or that it loads lazily."""
    return store.current.describe() if store.current else "Model loads on first use."


def refusal_notice(err: BaseException) -> str:
    """The notice line under the input for a refused or failed request (markdown, with the reason escaped)."""
    if isinstance(err, ModelLoadError):
        return f"**Not loaded:** {html.escape(err.public)}"
    if isinstance(err, ValueError):
        return f"**Refused:** {html.escape(str(err))}"
    return f"**Failed:** {type(err).__name__} (the server's log has the details)"


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit(
            "the demo needs gradio: pip install 'gradio>=6,<7' matplotlib  (or the project's [demo] extra)"
        ) from None
    return gr


def _theme():
    gr = _import_gradio()
    # System fonts only: the default theme would fetch web fonts, and the demo must work offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


CSS = """
#realb-heatmap table, #realb-precision table, #realb-balance table { font-size: 0.85em; }
#realb-balance td, #realb-balance th { padding: 2px 6px; text-align: right; }
"""

INTRO = """# ReaLB demo
Chat with a multimodal MoE model while ReaLB decides, per MoE layer and per batch, which (virtual) expert-parallel
ranks run in low precision. Attach an image, ask a question; **batch of N copies** sends your request N times in
one forward so the batch threshold can be crossed on a CPU (the answer shown is row 0's).
"""


def build_app(
    store: ModelStore | None = None,
    default_model: str = BUNDLED_MODEL,
    defaults: DemoSettings | None = None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
):
    """The gr.Blocks app. Every panel has a stable elem_id (see docs/demo.md) for tests and styling.

    The model box offers what `store.allowlist` admits; with the default allowlist it shows the bundled model only.
    """
    gr = _import_gradio()
    store = store or ModelStore()
    d = defaults or DemoSettings()
    from realb_hf.config import GRANULARITIES, LOW_PRECISION_CHOICES

    with gr.Blocks(title="ReaLB demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="realb-chat", label="chat", height=360)
                box = gr.MultimodalTextbox(
                    elem_id="realb-input",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about an image (attach it with the clip) or type a question",
                    show_label=False,
                    sources=["upload"],
                )
                notice = gr.Markdown("", elem_id="realb-notice")
                if display_name(resolve_model(default_model)) == BUNDLED_MODEL:
                    with gr.Accordion("Questions the bundled model knows", open=True):
                        gr.Markdown(
                            "It was trained on these forms only; other phrasings get wrong answers.\n"
                            + forms_markdown(),
                            elem_id="realb-forms",
                        )
                        gr.Examples(
                            [[m] for m in example_messages(EXAMPLE_FOLDER)],
                            inputs=[box],
                            label="Examples (click one, then press Enter)",
                            elem_id="realb-examples",
                            examples_per_page=len(QUESTION_FORMS),
                        )
                copies = gr.Slider(
                    1, MAX_COPIES, value=d.copies, step=1, label="batch of N copies", elem_id="realb-copies"
                )
                max_new = gr.Slider(1, 64, value=d.max_new_tokens, step=1, label="max new tokens")
            with gr.Column(scale=2):
                with gr.Group():
                    others = not store.allowlist.only_bundled
                    model_box = gr.Textbox(
                        value=default_model,
                        label="model" + (" (local folder or Hub id)" if others else ""),
                        elem_id="realb-model",
                        interactive=others,
                        info=f"this server offers: {store.allowlist.describe()}"
                        if others
                        else "this server offers the bundled model only (its operator can allow others: "
                        "realb-hf demo --allow-model FOLDER_OR_HUB_ID)",
                    )
                    load_btn = gr.Button("Load model", elem_id="realb-load", visible=others)
                    model_status = gr.Markdown(model_status_text(store), elem_id="realb-model-status")
                policy = gr.Dropdown(list(DEMO_POLICIES), value=d.policy, label="policy", elem_id="realb-policy")
                low = gr.Dropdown(list(LOW_PRECISION_CHOICES), value=d.low_precision, label="low precision")
                md = gr.Slider(0.0, 1.0, value=d.modality_threshold, step=0.05, label="M_d (modality threshold)")
                bt = gr.Number(value=d.batch_threshold, precision=0, minimum=0, label="batch threshold (tokens)")
                it = gr.Slider(0.0, 1.0, value=d.imbalance_threshold, step=0.05, label="imbalance threshold")
                gran = gr.Radio(list(GRANULARITIES), value=d.granularity, label="granularity")
                ep_choices = ep_size_choices(store.current.num_experts) if store.current else [1, 2, 4, 8]
                ep = gr.Dropdown(ep_choices, value=d.ep_size, label="virtual EP size", elem_id="realb-ep")
        gr.Markdown("## What ReaLB did (prefill forward of the last request)")
        summary = gr.Markdown(summary_markdown(None), elem_id="realb-summary")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Token load per MoE layer and EP rank")
                heatmap = gr.HTML(heatmap_html([]), elem_id="realb-heatmap")
            with gr.Column():
                gr.Markdown("### Precision map (which rank ran low)")
                precision = gr.HTML(precision_html([]), elem_id="realb-precision")
        gr.Markdown("### Balancedness before/after, lowered fraction, predicted speedup")
        balance = gr.HTML(balance_html([]), elem_id="realb-balance")

        def load(spec, current):
            previous = store.current
            try:
                loaded = store.get(spec)
            except ModelLoadError as err:  # the message a client may see; the current model stays loaded
                kept = f" Still loaded: **{html.escape(display_name(store.current.source))}**." if store.current else ""
                return f"**Not loaded:** {html.escape(err.public)}.{kept}", current
            if loaded is previous:  # same model, same EP choices: a plain value (see the note on gr.update below)
                return loaded.describe(), current
            choices = ep_size_choices(loaded.num_experts)
            if current not in choices:
                current = max(c for c in choices if c <= 8)
            return loaded.describe(), gr.update(choices=choices, value=current)

        load_btn.click(load, [model_box, ep], [model_status, ep])

        def page_loaded(current_ep):
            """A new tab says what is loaded now, not what was loaded when the page was built."""
            if store.current is None or ep_size_choices(store.current.num_experts) == ep_choices:
                return model_status_text(store), current_ep
            choices = ep_size_choices(store.current.num_experts)
            value = current_ep if current_ep in choices else max(c for c in choices if c <= 8)
            return model_status_text(store), gr.update(choices=choices, value=value)

        app.load(page_loaded, [ep], [model_status, ep], show_progress="hidden")

        controls = [model_box, policy, low, md, bt, it, gran, ep, copies, max_new]

        # Components get plain values, not `gr.update()`: gradio (6.x) keeps one more copy of a component's config
        # per request in the session when the component gets updates and also values or input. So the input box is
        # emptied and refilled in the browser (js), the chat history lives in a State, and only a change of model
        # updates the EP choices.
        held = gr.MultimodalTextbox(visible=False, file_types=["image"], file_count="multiple")  # message sent
        history = gr.State([])  # the chat, server side: a message queued behind another sees that one's answer
        # null: answered; {"keep_files": ...}: the refused message goes back, without its files when they were why
        refused_files = gr.JSON(None, visible=False)
        shown = gr.State(None)  # what the panels show: summary, 3 panels, model status, EP choices, EP size

        def respond(message, chat, spec, pol, lowp, mdv, btv, itv, granv, epv, n, new_tokens):
            """Answer one message. A refused one leaves the chat as it was, says why in the notice line under the
            input and goes back into the input (without a refused attachment)."""
            chat = list(chat or [])[-MAX_CHAT_MESSAGES:]
            before = list(chat)

            def refused(err: BaseException):
                logger.debug("request refused: %s", err)
                back = {"keep_files": not isinstance(err, UploadError)}
                return before, before, refusal_notice(err), gr.update(), back

            try:
                text, images, paths = parse_message(message)
                settings = DemoSettings(pol, lowp, mdv, btv, itv, granv, epv, n, new_tokens).validate()
            except ValueError as err:  # InputRefused, or a control's value
                yield refused(err)
                return
            for path in paths:
                chat.append({"role": "user", "content": {"path": path}})
            if text:
                chat.append({"role": "user", "content": text})
            chat.append({"role": "assistant", "content": "..."})
            del chat[:-MAX_CHAT_MESSAGES]
            yield chat, gr.update(), "", gr.update(), None
            try:
                previous = store.current
                loaded = store.get(spec)
                result = None
                requests = run_request(
                    loaded, text, images, settings, lock=store.run_lock, max_prompt_tokens=max_prompt_tokens
                )
                for item in requests:
                    if isinstance(item, RequestResult):
                        result = item
                    else:
                        chat[-1] = {"role": "assistant", "content": item}
                        yield chat, gr.update(), "", gr.update(), None
            except (ValueError, ModelLoadError) as err:  # refused before generating
                yield refused(err)
                return
            except Exception as err:  # a real failure: logged with its traceback, reported in the chat
                logger.exception("request failed")
                chat[-1] = {"role": "assistant", "content": f"(failed: {type(err).__name__})"}
                yield chat, chat, refusal_notice(err), gr.update(), None
                return
            chat[-1] = {"role": "assistant", "content": result.answer or "(empty answer)"}
            choices = ep_size_choices(loaded.num_experts) if previous is not loaded else None  # a new model
            yield chat, chat, "", (*render_panels(result), loaded.describe(), choices, settings.ep_size), None

        def show_panels(panels, current_ep):
            if panels is None:  # no answer yet in this session
                return (*render_panels(None), model_status_text(store), current_ep)
            *texts, choices, ep_size = panels
            return (*texts, ep_size if choices is None else gr.update(choices=choices, value=ep_size))

        # "multiple": a message sent while the previous one's steps still run is queued, never dropped.
        box.submit(None, [box], [held, box], js="(m) => [m, {text: '', files: []}]", trigger_mode="multiple").then(
            respond,
            [held, history, *controls],
            [chatbot, history, notice, shown, refused_files],
            show_progress_on=[chatbot],
            trigger_mode="multiple",
        ).then(
            show_panels,
            [shown, ep],
            [summary, heatmap, precision, balance, model_status, ep],
            show_progress="hidden",
            trigger_mode="multiple",
        ).then(
            None,
            [refused_files, held, box],
            [box],
            js="(r, sent, typed) => r === null ? typed : {text: sent.text, files: r.keep_files ? sent.files : []}",
            trigger_mode="multiple",
        )
        chatbot.clear(lambda: [], None, [history])
    return app


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    max_file_size_mb: float = MAX_UPLOAD_BYTES / 2**20,
    preload: bool = False,
    block: bool = True,
    quiet: bool = False,
    store: ModelStore | None = None,
    allow_models: Sequence[str] = (),
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_sessions: int = MAX_SESSIONS,
):
    """Serve the demo. Binds 127.0.0.1 unless told otherwise; uploads over `max_file_size_mb` are refused.

    Clients get `model` and the bundled model; `allow_models` (folders or Hub ids) opens more to them. Prompts
    longer than `max_prompt_tokens` per copy are refused. Gradio keeps the state of the last `max_sessions`
    sessions. With `block=False` it returns once the server is up (tests); `app.close()` stops it.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    store = store or ModelStore(device=device, allowlist=ModelAllowlist(allow_models))
    store.offer(model)
    if preload:
        store.get(model)
    app = build_app(store=store, default_model=model, max_prompt_tokens=max_prompt_tokens)
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=int(max_file_size_mb * 2**20),
        ssr_mode=False,
        theme=_theme(),
        css=CSS,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=quiet,
        inbrowser=False,
        state_session_capacity=max_sessions,
    )
    return app


def build_parser(prog: str = "python -m demo.app") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="local folder or Hub id (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-file-size-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20)
    parser.add_argument("--preload", action="store_true", help="load the model before serving (default: on first use)")
    parser.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="FOLDER_OR_HUB_ID",
        help="let the page load this Hub id, or any model folder under this folder (repeatable; default: clients "
        "get --model and the bundled model only)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"longest prompt per copy, chat template and image tokens included (default {MAX_PROMPT_TOKENS})",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m demo.app") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        launch(
            args.host,
            args.port,
            args.model,
            args.device,
            args.max_file_size_mb,
            args.preload,
            allow_models=args.allow_model,
            max_prompt_tokens=args.max_prompt_tokens,
        )
    except (ModelLoadError, ValueError) as err:
        print(f"realb-hf demo: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "MAX_CHAT_MESSAGES",
    "MAX_SESSIONS",
    "build_app",
    "build_parser",
    "launch",
    "main",
    "model_status_text",
    "refusal_notice",
]

if __name__ == "__main__":
    sys.exit(main())
