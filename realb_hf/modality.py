"""Per-token modality (text / image / video), captured from the model's inputs at every forward.

MoE blocks flatten (batch, seq, hidden) to (batch * seq, hidden), so a mask flattened the same way lines up
with the rows the experts see. Decoder layers of most VLMs pass nothing modality-related down to the MoE
block, hence the model's forward, wrapped (`TrackedForward`), reads `mm_token_type_ids` (else DeepSeek-VL2's
`images_seq_mask`, else compares `input_ids` with the image/video placeholder ids) and every experts module reads
the result.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2

SOURCE_TYPE_IDS = "mm_token_type_ids"
SOURCE_IMAGE_MASK = "images_seq_mask"  # DeepSeek-VL2 (remote code): bool (batch, seq), True on image positions
SOURCE_TOKEN_IDS = "input_ids"
SOURCE_NONE = "none"  # only embeddings were given: every token counts as text

# ERNIE-4.5-VL passes both; the moe_ variant (vision start/end tokens count as vision) is the one its
# expert pools split rows by, so it must win.
_TYPE_ID_KEYS = ("moe_mm_token_type_ids", "mm_token_type_ids")
POOL_TEXT = "text"
POOL_VISION = "vision"


def placeholder_ids(config) -> tuple[int | None, int | None]:
    """The image and video placeholder token ids of a (multimodal) model config, if it has them."""

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    # Kimi-VL (remote code) names its image placeholder `media_placeholder_token_id`.
    image = first("image_token_id", "image_token_index", "media_placeholder_token_id")
    return image, first("video_token_id", "video_token_index")


def modality_from_inputs(
    input_ids: torch.Tensor | None,
    mm_token_type_ids: torch.Tensor | None,
    image_token_id: int | None,
    video_token_id: int | None,
) -> tuple[torch.Tensor | None, str]:
    """(batch, seq) int8 modality codes and where they came from; None when nothing tells."""
    if mm_token_type_ids is not None:
        codes = mm_token_type_ids.to(torch.int8)
        if input_ids is not None and codes.shape[-1] > input_ids.shape[-1]:
            codes = codes[..., -input_ids.shape[-1] :]  # a caller passed the full history with one new token
        return codes, SOURCE_TYPE_IDS
    if input_ids is not None:
        codes = torch.zeros(input_ids.shape, dtype=torch.int8, device=input_ids.device)
        if image_token_id is not None:  # masked_fill_: a boolean-mask assignment goes through index_put_ first
            codes.masked_fill_(input_ids == image_token_id, IMAGE)
        if video_token_id is not None:
            codes.masked_fill_(input_ids == video_token_id, VIDEO)
        return codes, SOURCE_TOKEN_IDS
    return None, SOURCE_NONE


class _PerThread(threading.local):
    """Per thread: (codes, source) of the forward in flight, keyed by tracker id (an attribute from the start, so
    reading it never raises)."""

    def __init__(self) -> None:
        self.state: dict[int, tuple[torch.Tensor | None, str]] = {}


_THREAD = _PerThread()
_UNKNOWN = (None, SOURCE_NONE)


@dataclass(eq=False)
class ModalityTracker:
    """Holds the modality of the forward in flight, per thread (threads sharing one model each see their own);
    shared by every experts module of one model."""

    image_token_id: int | None = None
    video_token_id: int | None = None
    _attached: tuple | None = field(default=None, repr=False, compare=False)  # (model, its forward wrapper)

    def _state(self) -> tuple[torch.Tensor | None, str]:
        return _THREAD.state.get(id(self), _UNKNOWN)

    def _set(self, codes: torch.Tensor | None, source: str) -> None:
        if codes is None and source == SOURCE_NONE:
            _THREAD.state.pop(id(self), None)
        else:
            _THREAD.state[id(self)] = (codes, source)

    @property
    def codes(self) -> torch.Tensor | None:
        """Flattened (batch * seq,) int8 modality codes of this thread's forward in flight."""
        return self._state()[0]

    @codes.setter
    def codes(self, value: torch.Tensor | None) -> None:
        self._set(value, self.source)

    @property
    def source(self) -> str:
        return self._state()[1]

    @source.setter
    def source(self, value: str) -> None:
        self._set(self.codes, value)

    def capture(self, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        type_ids = next((kwargs[k] for k in _TYPE_ID_KEYS if kwargs.get(k) is not None), None)
        image_mask = kwargs.get(SOURCE_IMAGE_MASK) if type_ids is None else None
        if image_mask is not None:  # True (1) on image positions: the same codes as type ids
            type_ids = image_mask.to(torch.int8)
        codes, source = modality_from_inputs(input_ids, type_ids, self.image_token_id, self.video_token_id)
        if image_mask is not None:
            source = SOURCE_IMAGE_MASK
        self._set(None if codes is None else codes.reshape(-1), source)

    def clear(self) -> None:
        self._set(None, SOURCE_NONE)

    def for_rows(self, num_rows: int, pool: str | None = None) -> torch.Tensor | None:
        """Modality of the `num_rows` rows an experts module received, or None if unknown."""
        return self.rows(num_rows, pool)[0]

    def rows(self, num_rows: int, pool: str | None = None) -> tuple[torch.Tensor | None, str]:
        """(codes, source) of the `num_rows` rows an experts module received; (None, "none") if unknown.

        A modality-isolated expert pool (ERNIE-4.5-VL's text_moe / vision_moe) receives only the rows of
        its modality, in their original order, whenever the batch holds both.
        """
        state = _THREAD.state.get(id(self), _UNKNOWN)
        codes = state[0]
        if codes is None or codes.numel() == num_rows:
            return state
        if pool == POOL_TEXT:
            codes = codes[codes == TEXT]
        elif pool == POOL_VISION:
            codes = codes[codes != TEXT]
        return (codes, state[1]) if codes.numel() == num_rows else _UNKNOWN

    def attach(self, model: torch.nn.Module, on_forward=None, on_end=None) -> None:
        """Capture at every forward of `model` (generate's decode steps included) and clear afterwards, also when
        the forward raises; `on_forward` / `on_end` run at the same points."""
        self.detach()
        original = model.forward
        # a partial over a method of the tracking object, as accelerate wraps forwards: torch.export reads the code
        # of `model.forward` (a partial's `func`), and generate its signature (`__wrapped__`)
        tracked = TrackedForward(self, original, on_forward, on_end)
        wrapper = functools.update_wrapper(functools.partial(TrackedForward.__call__, tracked), original)
        model.forward = wrapper
        self._attached = (model, wrapper)

    def detach(self) -> None:
        """Give the model its own forward back. A wrapper set on top of ours since (another library's) would lose
        ours and still call it: that is refused, naming the wrapper to remove first."""
        if self._attached is None:
            return
        model, wrapper = self._attached
        current = model.__dict__.get("forward")
        if current is not wrapper:
            raise RuntimeError(
                f"{type(model).__name__}.forward was wrapped again after ReaLB's modality tracking ({current!r});"
                " remove that wrapper first, then detach ReaLB's"
            )
        del model.forward
        self._attached = None


class TrackedForward:
    """A model's forward while a tracker is attached: capture, forward, clear (also when the forward raises).

    A wrapped forward rather than module hooks: torch.compile of `model.__call__` (generate's compiled decode step)
    skips nn.Module's call machinery, so hooks become frames of their own around the forward, each with its guards
    and its graph; the wrapper is traced with the forward into one frame and one graph. An object, not a closure:
    `copy.deepcopy(model)` copies it with the model (rebinding the forward), so a copied model's forwards reach the
    copy's tracker and runtime, not the original's."""

    def __init__(self, tracker: ModalityTracker, forward, on_forward=None, on_end=None):
        self.tracker, self.forward, self.on_forward, self.on_end = tracker, forward, on_forward, on_end

    def __call__(self, *args, **kwargs):
        if self.on_forward is not None:  # first: a compiled forward's host operator then leads its graph
            self.on_forward()
        self.tracker.capture(args, kwargs)
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.tracker.clear()
            if self.on_end is not None:
                self.on_end()
