"""One request: tokenize it with the model's chat template, replicate it into N copies, generate row 0's answer
while streaming it, and hand back the answer with the telemetry of every forward."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .inputs import InputRefused, UploadError, build_messages, replicate_batch
from .models import LoadedModel, display_name
from .panels import RequestResult
from .settings import DemoSettings

MAX_PROMPT_TOKENS = 1024  # per copy, after the chat template and image tokens (server option --max-prompt-tokens)


def _row0_streamer(tokenizer, timeout: float):
    """A TextIteratorStreamer that follows row 0 of a batch (transformers' streamers refuse batches > 1)."""
    from transformers import TextIteratorStreamer

    class Row0Streamer(TextIteratorStreamer):
        def put(self, value):
            return super().put(value[:1] if value.shape[0] > 1 else value)

    return Row0Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)


def prompt_token_limit(loaded: LoadedModel, max_prompt_tokens: int, max_new_tokens: int) -> tuple[int, str]:
    """(tokens one copy's prompt may have, why): the server's cap, or less when the model's context is shorter."""
    text_config = loaded.model.config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and context - max_new_tokens < max_prompt_tokens:
        why = f"the model's context of {context} positions minus {max_new_tokens} new"
        return max(context - max_new_tokens, 0), why
    return max_prompt_tokens, "the server's --max-prompt-tokens"


def prepare_inputs(
    loaded: LoadedModel,
    text: str,
    images: Sequence[Any],
    copies: int,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_new_tokens: int = 0,
) -> dict[str, Any]:
    """Tokenize one request with the model's chat template and replicate it `copies` times.

    Raises `InputRefused` when one copy's prompt is longer than `prompt_token_limit` allows.
    """
    if images and not loaded.is_vlm:
        raise UploadError("this model reads text only: remove the image")
    processor = loaded.processor
    messages = build_messages(text, images)
    if getattr(processor, "chat_template", None):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    else:  # no chat template: plain text (and images) straight through the processor
        kwargs = {"images": list(images)} if images else {}
        inputs = processor(text=text, return_tensors="pt", **kwargs)
    tokens = int(inputs["input_ids"].shape[1])
    limit, why = prompt_token_limit(loaded, max_prompt_tokens, max_new_tokens)
    if tokens > limit:
        raise InputRefused(
            f"the prompt is {tokens} tokens (chat template and image tokens included); "
            f"this demo takes at most {limit} per copy ({why}): shorten the question or attach fewer images"
        )
    return replicate_batch(dict(inputs), copies)


def run_request(
    loaded: LoadedModel,
    text: str,
    images: Sequence[Any],
    settings: DemoSettings,
    lock: threading.Lock | None = None,
    timeout: float = 600.0,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
) -> Iterator[str | RequestResult]:
    """Generate row 0's answer: yields the growing answer text, then one `RequestResult` at the end."""
    import torch

    import realb_hf

    settings.validate(loaded.num_experts)
    inputs = prepare_inputs(loaded, text, images, settings.copies, max_prompt_tokens, settings.max_new_tokens)
    model = loaded.model
    device = model.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    ids = inputs["input_ids"]
    image_token = getattr(model.config, "image_token_id", None)
    image_tokens = int((ids[0] == image_token).sum()) if image_token is not None else 0
    lock = lock or threading.Lock()
    with lock:
        realb_hf.get_runtime(model).reconfigure(**settings.runtime_changes())
        telemetry = realb_hf.get_telemetry(model)
        telemetry.reset()
        streamer = _row0_streamer(tokenizer, timeout)
        failure: list[BaseException] = []
        output: list[Any] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    output.append(
                        model.generate(
                            **inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, streamer=streamer
                        )
                    )
            except BaseException as err:  # surfaced in the caller's thread below
                failure.append(err)
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="realb-demo-generate", daemon=True)
        thread.start()
        answer = ""
        try:
            for piece in streamer:
                answer += piece
                if piece:
                    yield answer
        finally:  # also when the caller stops early: keep the knobs fixed until this generation is over
            thread.join()
        seconds = time.perf_counter() - start
        if failure:
            raise failure[0]
        records = list(telemetry.records)
    generated = output[0][0, ids.shape[1] :]
    final = tokenizer.decode(generated, skip_special_tokens=True).strip()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    new_tokens = sum(1 for t in generated.tolist() if t not in eos_ids and t != tokenizer.pad_token_id)
    yield RequestResult(
        answer=final,
        records=records,
        copies=settings.copies,
        prompt_tokens=int(ids.shape[1]),
        image_tokens=image_tokens,
        new_tokens=new_tokens,
        seconds=seconds,
        settings=settings,
        model=display_name(loaded.source),
    )


__all__ = ["MAX_PROMPT_TOKENS", "prepare_inputs", "prompt_token_limit", "run_request"]
