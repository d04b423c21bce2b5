"""The batches the end-to-end prefill benchmarks time, and the forward they time on them.

Image-text rows for a Qwen3-VL-MoE config (one square image and text per request, as close to the asked vision
share as a square grid allows), or a recorded trace's shape and modality with text tokens (the vision tower does
not run then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PrefillBatch:
    kwargs: dict[str, Any]
    codes: torch.Tensor  # (batch * seq,) int8 modality of every row the MoE layers see
    requests: int
    request_tokens: int
    image_tokens_per_request: int

    @property
    def tokens(self) -> int:
        return self.requests * self.request_tokens

    @property
    def vision_share(self) -> float:
        return float((self.codes != 0).float().mean())


def image_text_batch(
    config,
    requests: int,
    request_tokens: int,
    vision_share: float,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> PrefillBatch:
    """`requests` rows of `request_tokens`: <vision_start> image <vision_end> text; one square image per row
    with as close to `vision_share * request_tokens` image tokens as a square grid allows."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = max(1, round(math.sqrt(request_tokens * vision_share)))
    while side > 1 and side * side > request_tokens - 3:
        side -= 1
    image_tokens = side * side
    text_tokens = request_tokens - image_tokens - 2
    if text_tokens < 1:
        raise ValueError(f"request_tokens={request_tokens} is too small for an image and text")
    h = w = side * merge
    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    rows, types = [], []
    for _ in range(requests):
        text = torch.randint(10, min(vocab, 150000), (text_tokens,), generator=gen).tolist()
        rows.append(
            [config.vision_start_token_id]
            + [config.image_token_id] * image_tokens
            + [config.vision_end_token_id]
            + text
        )
        types.append([0] + [1] * image_tokens + [0] * (text_tokens + 1))
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    input_ids = torch.tensor(rows, device=device)
    mm = torch.tensor(types, dtype=torch.int32, device=device)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(requests * h * w, patch_dim, generator=gen).to(device, dtype),
        image_grid_thw=torch.tensor([[1, h, w]] * requests, device=device),
        mm_token_type_ids=mm,
    )
    return PrefillBatch(kwargs, mm.reshape(-1).to(torch.int8), requests, request_tokens, image_tokens)


def trace_batch(config, trace, device: torch.device, seed: int = 0) -> PrefillBatch:
    """Text tokens of the trace's recorded (batch, seq) with its recorded modality as mm_token_type_ids."""
    first = trace.forwards[0]
    shape = first.input_shape
    routing = first.routing[trace.layers[0]]
    rows = routing.top_k_index.shape[0]
    if shape is None or shape[0] * shape[1] != rows:
        shape = [1, rows]
    codes = routing.modality if routing.modality is not None else torch.zeros(rows, dtype=torch.int8)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, min(config.text_config.vocab_size, 150000), tuple(shape), generator=gen).to(device)
    mm = codes.to(torch.int32).view(*shape).to(device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm)
    return PrefillBatch(kwargs, codes.to(device), shape[0], shape[1], 0)


def prefill_forward(model, batch: PrefillBatch):
    """One prefill forward as the benchmarks time it: no KV cache, logits of the last position only."""
    return model(**batch.kwargs, use_cache=False, logits_to_keep=1)


__all__ = ["PrefillBatch", "image_text_batch", "prefill_forward", "trace_batch"]
