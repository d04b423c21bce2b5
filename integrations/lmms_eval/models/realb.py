"""lmms-eval model `realb`: a Hugging Face VLM loaded with `quantization_config=RealbConfig(...)`.

Two classes, one implementation:

- `RealbChat` (lmms-eval "chat" model, the default for `--model realb`): requests carry the task's chat messages
  (`doc_to_messages`), images in place.
- `Realb` ("simple" model, `--force_simple` or the `LMMS_EVAL_PLUGINS` route): requests carry a text context and
  the task's visuals; the user turn is the images followed by the text. Only this mode gets loglikelihood
  requests (multiple-choice tasks), because lmms-eval's chat tasks build generation requests only.

Both batch `batch_size` requests of one task (and one set of generation kwargs) per forward, left padded, and
record what ReaLB did in each batch (see `integrations.lmms_eval.report`). When lmms-eval finishes a run it calls
`clean()`; the telemetry is written then, next to lmms-eval's results.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import require_lmms_eval
from .._args import REALB_FIELDS, as_bool, as_json_dict, realb_config_from_args, split_realb_args
from ..report import RECORD_MODES, EvalReport

require_lmms_eval()
from lmms_eval.api.instance import GenerationResult, TokenCounts  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402


def _filelock_compat() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` patches filelock 3's private `filelock._api.FileLockMeta` (a fix for ranks
    loading datasets concurrently). filelock 4 (what torch / huggingface_hub install today) has no `filelock._api`,
    so that patch raises ModuleNotFoundError before any task loads; with filelock 4, mark it as already applied."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("filelock") is None or importlib.util.find_spec("filelock._api") is not None:
        return
    evaluator = importlib.import_module("lmms_eval.evaluator")
    patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if patch is not None:
        patch._patched = True


_filelock_compat()

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_DTYPES |= {"float32": torch.float32, "fp32": torch.float32}
# Generation kwargs of lmms-eval tasks passed on to `generate` as they are (the rest are named in a warning).
_PASSTHROUGH_GENERATE = ("top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size")
_IGNORED_GENERATE = ("image_aspect_ratio", "use_cache")  # lmms-eval task keys with no meaning here

# Set by `python -m integrations.lmms_eval` for the run in progress: the CLI's --output_path and the datetime string
# lmms-eval names its results with, so the telemetry files sit next to `<date>_results.json` with the same <date>.
CLI_OUTPUT_PATH: str | None = None
CLI_DATETIME_STR: str | None = None
# Reports of finished runs (appended by `clean()`), for the launcher to put into lmms-eval's results JSON.
FINISHED: list[dict[str, Any]] = []


@dataclass
class _Prompt:
    """One request, normalised: chat messages with image placeholders, the images in order, and its task."""

    messages: list[dict[str, Any]]
    images: list[Any]
    task: str
    context: str


def _as_image(visual: Any):
    from PIL import Image

    if isinstance(visual, Image.Image):
        return visual if visual.mode == "RGB" else visual.convert("RGB")
    if isinstance(visual, dict) and visual.get("bytes") is not None:  # a datasets Image feature left undecoded
        return Image.open(io.BytesIO(visual["bytes"])).convert("RGB")
    if isinstance(visual, dict) and isinstance(visual.get("path"), str):
        visual = visual["path"]
    if isinstance(visual, str) and visual.lower().endswith(_IMAGE_EXTS):
        return Image.open(visual).convert("RGB")
    raise NotImplementedError(
        f"the realb lmms-eval model takes images (PIL images or image files); got {type(visual).__name__} "
        f"{str(visual)[:80]!r} (video and audio inputs are not supported)"
    )


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out: list[Any] = []
    for v in visuals:
        out.extend(_flatten_visuals(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _cli_arg(flag: str) -> str | None:
    """The value of `flag` on the lmms-eval command line this process runs, if it runs one."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", "")
    running_cli = (
        "lmms_eval.__main__" in sys.modules
        or spec_name in ("lmms_eval.__main__", "integrations.lmms_eval.__main__")
        or Path(sys.argv[0] if sys.argv else "").name in ("lmms-eval", "lmms_eval")
    )
    if not running_cli:
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(flag, dest="value", default=None)
    try:
        known, _ = parser.parse_known_args(sys.argv[1:])
    except SystemExit:  # the flag without a value: lmms-eval itself rejects that
        return None
    return known.value


class Realb(lmms):
    """A Hugging Face VLM under ReaLB (or stock with `realb=false`), lmms-eval "simple" interface."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        realb: bool = True,
        dtype: str = "bfloat16",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 1024,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        revision: str | None = None,
        processor_kwargs: str | dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        telemetry_path: str | None = None,
        telemetry_records: str = "prefill",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        realb_args, unknown = split_realb_args(kwargs)
        if unknown:
            own = [p for p in inspect.signature(Realb.__init__).parameters if p not in ("self", "kwargs")]
            raise ValueError(
                f"realb model: unknown model arg(s) {sorted(unknown)}; accepted: {own} and the RealbConfig fields "
                f"{list(REALB_FIELDS)}"
            )
        self.use_realb = as_bool("realb", realb)
        if not self.use_realb and realb_args:
            raise ValueError(f"realb=false loads the stock model; drop the RealbConfig field(s) {sorted(realb_args)}")
        self.realb_config = realb_config_from_args(realb_args) if self.use_realb else None
        if telemetry_records not in RECORD_MODES:
            raise ValueError(f"telemetry_records={telemetry_records!r}; choose one of {list(RECORD_MODES)}")
        self._batch_size = self._parse_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt.replace("\\n", "\n")) if system_prompt else None
        self.pretrained = str(pretrained)
        self.telemetry_path = telemetry_path
        self.telemetry_files: dict[str, Path] = {}

        self._setup_device(device)
        self._model = self._load_model(
            dtype, device_map, as_bool("trust_remote_code", trust_remote_code), attn_implementation, revision
        )
        self.processor = self._load_processor(
            as_bool("trust_remote_code", trust_remote_code), revision, processor_kwargs, min_pixels, max_pixels
        )
        self._tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self._model.forward).parameters
        self._warned: set[str] = set()

        import realb_hf

        self._telemetry = realb_hf.get_telemetry(self._model) if self.use_realb else None
        low = None
        if self.use_realb:
            low = realb_hf.get_runtime(self._model).params(self._input_device).low
        self.realb_report = EvalReport(
            {
                "model": self.pretrained,
                "interface": "simple" if self.is_simple else "chat",
                "realb_config": self.realb_config.to_dict() if self.realb_config is not None else None,
                "low_precision_resolved": low,
                "dtype": str(self._model.dtype).replace("torch.", ""),
                "device": str(self._input_device),
                "batch_size": self._batch_size,
                "rank": self._rank,
                "world_size": self._world_size,
                "started": datetime.now().isoformat(timespec="seconds"),
            },
            records=telemetry_records,
            high=self.realb_config.high_precision if self.realb_config is not None else "bf16",
        )

    # ---- set-up ------------------------------------------------------------------------------------------

    @staticmethod
    def _parse_batch_size(value: Any) -> int:
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"realb model: batch_size={value!r} must be a positive integer ('auto' is not supported)"
            ) from None
        if size < 1:
            raise ValueError(f"realb model: batch_size={value!r} must be a positive integer")
        return size

    def _setup_device(self, device: str | None) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # lmms-eval data parallel (accelerate launch / torchrun): one full model per process
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _load_model(self, dtype, device_map, trust_remote_code, attn_implementation, revision):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        import realb_hf  # noqa: F401  (registers quant_method "realb" with transformers)

        kwargs: dict[str, Any] = {
            "dtype": _DTYPES.get(str(dtype).lower(), dtype),
            "device_map": device_map or str(self._device),
        }
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if revision:
            kwargs["revision"] = str(revision)
        if self.realb_config is not None:
            kwargs["quantization_config"] = self.realb_config
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.pretrained, **kwargs)
        except ValueError as err:  # a text-only MoE: its config has no image-text-to-text class
            if "Unrecognized configuration class" not in str(err):
                raise
            model = AutoModelForCausalLM.from_pretrained(self.pretrained, **kwargs)
        model.eval()
        self._input_device = model.get_input_embeddings().weight.device
        return model

    def _load_processor(self, trust_remote_code, revision, processor_kwargs, min_pixels, max_pixels):
        from transformers import AutoProcessor

        kwargs = as_json_dict("processor_kwargs", processor_kwargs)
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if revision:
            kwargs["revision"] = str(revision)
        return AutoProcessor.from_pretrained(self.pretrained, **kwargs)

    # ---- lmms-eval plumbing ------------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Like lmms-eval's, but a value in `--model_args` wins over the CLI's (e.g. batch_size=8 vs --batch_size 1)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._input_device

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    # ---- requests -> prompts ------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _user_turn(self, visuals: list[Any], text: str) -> list[dict[str, Any]]:
        content = [{"type": "image", "url": v} for v in visuals]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def _normalise(self, messages: list[dict[str, Any]], task: str, context: str) -> _Prompt:
        """Messages with `{"type": "image"}` placeholders (what chat templates expect) and the images in order."""
        out: list[dict[str, Any]] = []
        images: list[Any] = []
        for message in messages:
            content = message.get("content", [])
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            items: list[dict[str, Any]] = []
            for item in content:
                kind = item.get("type")
                if kind == "text":
                    items.append({"type": "text", "text": item.get("text", "")})
                elif kind == "image":
                    source = next((item[k] for k in ("url", "image", "path") if item.get(k) is not None), None)
                    images.append(_as_image(source))
                    items.append({"type": "image"})
                else:
                    raise NotImplementedError(
                        f"the realb lmms-eval model takes text and images; task {task!r} sent {kind!r} content"
                    )
            out.append({"role": message["role"], "content": items})
        if self.system_prompt and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return _Prompt(out, images, task, context)

    def _prompt_from_simple(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> _Prompt:
        visuals = _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []
        text = context.replace("<image>", "").strip() if visuals else context
        return self._normalise(self._user_turn(visuals, text), task, context)

    def _generation_prompt(self, args: tuple) -> tuple[_Prompt, dict[str, Any]]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return self._prompt_from_simple(context, doc_to_visual, doc_id, task, split), gen_kwargs

    def _chat_text(self, prompt: _Prompt) -> str:
        return self.processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str], images: list[Any]):
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "padding_side": "left", "return_tensors": "pt"}
        if images:
            if not hasattr(self.processor, "image_processor"):
                raise ValueError(f"{self.pretrained} has no image processor, but the task sent images")
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        inputs = inputs.to(self._input_device)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(self._model.dtype)
        return inputs

    def _batches(self, requests: list, key: Callable[[tuple], Any]) -> list[tuple[Any, list[int]]]:
        """Request indices grouped by `key` (task, generation kwargs), in arrival order, cut into batches."""
        groups: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(key(request.args), []).append(i)
        n = self._batch_size
        return [(k, idx[s : s + n]) for k, idx in groups.items() for s in range(0, len(idx), n)]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def _generate_kwargs(self, gen_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        # "\n\n" is lmms-eval's default stop string (its few-shot delimiter); a chat model's answer may hold blank
        # lines before the final answer, so it is dropped here as lmms-eval's own Qwen-VL models drop it.
        until = [u for u in until if isinstance(u, str) and u and u != "\n\n"]
        temperature = float(g.pop("temperature", 0) or 0)
        top_p = g.pop("top_p", None)
        do_sample = g.pop("do_sample", None)
        out: dict[str, Any] = {
            "max_new_tokens": int(g.pop("max_new_tokens", self.max_new_tokens)),
            "num_beams": int(g.pop("num_beams", 1) or 1),
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if temperature > 0 and do_sample is not False:
            out.update(do_sample=True, temperature=temperature)
            if top_p is not None:
                out["top_p"] = float(top_p)
        else:
            out["do_sample"] = False
        for key in _PASSTHROUGH_GENERATE:
            if key in g:
                out[key] = g.pop(key)
        ignored = sorted(k for k in g if k not in _IGNORED_GENERATE)
        if ignored:
            self._warn_once(f"realb model: generation kwargs {ignored} are not passed to generate")
        return out, until

    # ---- telemetry ---------------------------------------------------------------------------------------

    def _start_batch(self) -> None:
        if self._telemetry is not None:
            self._telemetry.reset()  # one batch at a time: prefill is forward 1

    def _end_batch(self, task, request_type, prompts, inputs, generated_tokens, seconds) -> None:
        records = dropped = None
        if self._telemetry is not None:
            records = list(self._telemetry.records)
            dropped = self._telemetry.dropped
        self.realb_report.add_batch(
            task=task,
            request_type=request_type,
            requests=len(prompts),
            prompt_tokens=int(inputs["input_ids"].numel()),
            images=sum(len(p.images) for p in prompts),
            generated_tokens=generated_tokens,
            seconds=seconds,
            records=records,
            prefill_forward=1,
            dropped=dropped or 0,
        )

    # ---- lmms interface ----------------------------------------------------------------------------------

    def generate_until(self, requests) -> list:
        from tqdm import tqdm

        results: list[Any] = [None] * len(requests)

        def key(args: tuple) -> tuple:
            prompt_args = self._split_generation_args(args)
            return prompt_args["task"], repr(sorted((prompt_args["gen_kwargs"] or {}).items(), key=str))

        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="realb generate_until")
        for _, idx in self._batches(requests, key):
            built = [self._generation_prompt(requests[i].args) for i in idx]
            prompts = [p for p, _ in built]
            gen_kwargs, until = self._generate_kwargs(built[0][1])
            texts = [self._chat_text(p) for p in prompts]
            inputs = self._encode(texts, [im for p in prompts for im in p.images])
            self._start_batch()
            start = time.perf_counter()
            with torch.no_grad():
                out = self._model.generate(**inputs, **gen_kwargs)
            seconds = time.perf_counter() - start
            new = out[:, inputs["input_ids"].shape[1] :]
            pad = self._tokenizer.pad_token_id
            counts = (new != pad).sum(dim=1).tolist() if pad is not None else [new.shape[1]] * len(idx)
            answers = self._tokenizer.batch_decode(new, skip_special_tokens=True)
            self._end_batch(prompts[0].task, "generate_until", prompts, inputs, int(sum(counts)), seconds)
            for i, answer, count, prompt, raw in zip(idx, answers, counts, prompts, built):
                for term in until:
                    answer = answer.split(term)[0]
                self.cache_hook.add_partial("generate_until", (prompt.context, raw[1]), answer)
                results[i] = GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=int(count)))
            pbar.update(len(idx))
        pbar.close()
        return results

    def _split_generation_args(self, args: tuple) -> dict[str, Any]:
        context, gen_kwargs, _doc_to_visual, _doc_id, task, _split = args
        return {"context": context, "gen_kwargs": gen_kwargs, "task": task}

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) per request: the mean negative log-likelihood of the continuation's tokens given the
        images + context under the chat template, and whether greedy decoding would produce the continuation.

        lmms-eval's convention, not lm-eval-harness's: its multiple-choice scoring takes the argmin of the first
        value (its HF models return `outputs.loss`), so this returns a loss, lower is better.
        """
        from tqdm import tqdm

        results: list[Any] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="realb loglikelihood")
        unconditional = "(unconditional)"  # task name in the telemetry of lmms-eval's ("", continuation) requests
        for _, idx in self._batches(requests, key=lambda args: args[4] if len(args) > 4 else unconditional):
            prompts, conts = [], []
            for i in idx:
                args = requests[i].args
                if len(args) == 2:  # unconditional (mutual-information) requests: ("", continuation)
                    context, continuation = args
                    prompt = self._normalise(self._user_turn([], context), unconditional, context)
                else:
                    context, continuation, doc_to_visual, doc_id, task, split = args
                    if callable(continuation):
                        continuation = continuation(self._doc(task, split, doc_id))
                    prompt = self._prompt_from_simple(context, doc_to_visual, doc_id, task, split)
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                prompts.append(prompt)
                conts.append(str(continuation))
            scores = self._score(prompts, conts)
            for i, score, prompt, cont in zip(idx, scores, prompts, conts):
                # lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output`, which turns
                # a (float, bool) tuple into its str() (multiple-choice scoring then fails); a GenerationResult's
                # `text` is passed on as it is, so the tuple travels in there.
                results[i] = GenerationResult(text=score)
                self.cache_hook.add_partial("loglikelihood", (prompt.context, cont), score)
            pbar.update(len(idx))
        pbar.close()
        return results

    def _score(self, prompts: list[_Prompt], continuations: list[str]) -> list[tuple[float, bool]]:
        """One forward for the batch: left-padded prompts (processor) + right-padded continuation tokens."""
        texts = [self._chat_text(p) for p in prompts]
        inputs = self._encode(texts, [im for p in prompts for im in p.images])
        cont_ids = [self._tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for c in continuations]
        batch, length = inputs["input_ids"].shape
        width = max((len(c) for c in cont_ids), default=0)
        if width == 0:
            return [(0.0, True)] * batch
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        device = inputs["input_ids"].device
        tokens = torch.full((batch, width), pad, dtype=inputs["input_ids"].dtype, device=device)
        mask = torch.zeros((batch, width), dtype=inputs["attention_mask"].dtype, device=device)
        for row, ids in enumerate(cont_ids):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=tokens.dtype, device=device)
            mask[row, : len(ids)] = 1
        for key, value in list(inputs.items()):
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (batch, length):
                continue
            if key == "input_ids":
                inputs[key] = torch.cat([value, tokens], dim=1)
            elif key == "attention_mask":
                inputs[key] = torch.cat([value, mask], dim=1)
            else:  # per-token side inputs (mm_token_type_ids, token_type_ids): continuation tokens are text
                inputs[key] = torch.cat([value, value.new_zeros((batch, width, *value.shape[2:]))], dim=1)
        extra = {"logits_to_keep": width + 1} if self._logits_to_keep else {}
        self._start_batch()
        start = time.perf_counter()
        with torch.no_grad():
            logits = self._model(**inputs, use_cache=False, **extra).logits
        seconds = time.perf_counter() - start
        # logits at position p predict token p + 1: continuation token j (position length + j) <- length + j - 1
        logits = logits[:, :width] if self._logits_to_keep else logits[:, length - 1 : length - 1 + width]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(dim=-1) == tokens
        self._end_batch(prompts[0].task, "loglikelihood", prompts, inputs, 0, seconds)
        out = []
        for row, ids in enumerate(cont_ids):
            n = len(ids)
            out.append((float(-picked[row, :n].mean()), bool(greedy[row, :n].all())))
        return out

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("the realb lmms-eval model does not implement multi-round generation")

    # ---- end of run --------------------------------------------------------------------------------------

    def _results_dir(self) -> Path | None:
        if self.telemetry_path:
            return Path(self.telemetry_path)
        output_path = CLI_OUTPUT_PATH if CLI_OUTPUT_PATH is not None else _cli_arg("--output_path")
        if not output_path:
            return None
        from lmms_eval.utils import sanitize_model_name

        return Path(output_path) / sanitize_model_name(self.pretrained)

    def write_telemetry(self, directory: str | Path | None = None) -> dict[str, Path]:
        """Write the run's ReaLB summary + telemetry into `directory` (default: next to lmms-eval's results)."""
        directory = Path(directory) if directory is not None else self._results_dir()
        if directory is None:
            return {}
        if CLI_DATETIME_STR:
            stamp = CLI_DATETIME_STR.replace(":", "-")
        else:
            from lmms_eval.utils import get_datetime_str

            timezone = _cli_arg("--timezone")  # lmms-eval's clock, so stamps sort with its results' stamps
            stamp = get_datetime_str(timezone=timezone) if timezone else get_datetime_str()
        if self._world_size > 1:
            stamp += f"_rank{self._rank}"
        self.telemetry_files = self.realb_report.write(directory, stamp)
        return self.telemetry_files

    def clean(self) -> None:
        """lmms-eval calls this when the model has answered every request: write the telemetry, then free the model."""
        from loguru import logger

        files = self.write_telemetry()
        summary = self.realb_report.summary()
        FINISHED.append({"summary": summary, "files": {k: str(v) for k, v in files.items()}})
        if files:
            logger.info(f"ReaLB telemetry written: {', '.join(str(p) for p in files.values())}")
        else:
            logger.info("ReaLB telemetry kept in memory (lm.realb_report): no --output_path and no telemetry_path")
        prefill = summary["overall"]["prefill"]
        logger.info(
            f"ReaLB prefill: lowered {100 * prefill['lowered_token_fraction']:.1f}% of token-expert pairs, "
            f"{100 * prefill['layers_lowered_fraction']:.1f}% of layer records, predicted speedup "
            f"{prefill['predicted_speedup']:.3f}"
        )
        self._telemetry = None
        super().clean()


class RealbChat(Realb):
    """The same model, lmms-eval "chat" interface: the task's chat messages, images in place."""

    is_simple = False

    def _split_generation_args(self, args: tuple) -> dict[str, Any]:
        context, _doc_to_messages, gen_kwargs, _doc_id, task, _split = args
        return {"context": context, "gen_kwargs": gen_kwargs, "task": task}

    def _generation_prompt(self, args: tuple) -> tuple[_Prompt, dict[str, Any]]:
        context, doc_to_messages, gen_kwargs, doc_id, task, split = args
        messages = doc_to_messages(self._doc(task, split, doc_id))
        if hasattr(messages, "messages"):  # a protocol.ChatMessages
            messages = [m.model_dump() for m in messages.messages]
        return self._normalise(list(messages), task, context), gen_kwargs
