"""Train the precision-sensitive Qwen3-VL-MoE of `demo/sensitive/model/` (seeded; one GPU, or the CPU).

    python -m demo.sensitive.train                      # writes demo/sensitive/model/ (1600 steps x 256)
    python -m demo.sensitive.train --steps 20 --out /tmp/s --check-every 0   # smoke run

The demo's model is too small and its tasks too easy for any precision to move an answer. This one is larger
(6 MoE layers, 16 experts, top-4, hidden 256; a 4-block vision tower on 112x112 images, 49 vision tokens) and its
tasks (`demo/sensitive/tasks.py`) keep answers near decision boundaries. It reuses the demo's tokenizer,
processor and batch builders (`demo/train.py`); only the sizes and the tasks differ.

Same seed, same weights: examples depend only on their index, batches are built in index order whatever the
number of data workers, and CUDA runs with deterministic algorithms. Every `--check-every` steps it prints the
held-out (set 1) accuracy of the answer token in bf16 and with every MoE layer in nvfp4 and mxfp4
(`RealbConfig(policy="all_low")`), so the log shows how sensitive the model is while it trains; the final numbers
come from `python -m realb_hf.accuracy` on held-out set 0.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read when CUDA starts

import torch  # noqa: E402

if __package__ in (None, ""):  # `python demo/sensitive/train.py`: make `demo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# demo/sensitive/ lives in a checkout only (not in the wheel), where `demo` is a top-level package
from demo.sensitive.tasks import IMAGE_SIZE, heldout_set, train_example, vocabulary  # noqa: E402
from demo.train import FastCollator, answer_loss, build_processor, build_tokenizer, make_optimizer, save  # noqa: E402
from demo.train import build_config as demo_config  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "model"


def build_config(tokenizer):
    """The demo's Qwen3-VL-MoE, larger: 6 MoE layers, 16 experts, top-4, hidden 256, a 4-block vision tower."""
    return demo_config(
        tokenizer,
        hidden=256,
        layers=6,
        heads=8,
        kv_heads=4,
        experts=16,
        top_k=4,
        dense_width=512,
        vision_depth=4,
        vision_hidden=128,
        deepstack=(1,),
        image_size=IMAGE_SIZE,
    )


# transformers hands the vision tower's `cu_seqlens` only to attention functions whose name holds "flash"; every
# other implementation is called once per image. This one is plain attention, batched over images of one size.
VISION_ATTENTION = "flash_free_equal_images"


def equal_images_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Each image attends within itself, every image of the batch in one call: (1, heads, n*L, d) -> (1, n*L, heads,
    d). Training only; the saved model uses the stock attention."""
    _, heads, total, dim = query.shape
    images = kwargs["cu_seq_lens_q"].numel() - 1
    length = total // images
    if length * images != total or kwargs["max_length_q"] != length:
        raise ValueError("equal_images_attention needs every image to have the same number of patches")
    q, k, v = (t.reshape(heads, images, length, dim).transpose(0, 1) for t in (query, key, value))
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)
    out = torch.matmul(weights, v)  # (images, heads, L, d)
    return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None


class Batches(torch.utils.data.Dataset):
    """Batch `step` = training examples [step * size, (step + 1) * size), collated, with their M-RoPE position ids:
    the model's own `get_rope_index` walks the batch row by row with a host sync per image, which on a GPU costs
    more than the step itself, so data workers run it on the CPU."""

    def __init__(self, collate: FastCollator, config, size: int):
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel

        self.collate, self.size = collate, size
        with torch.device("meta"):  # only its config and index methods are used
            self.positions = Qwen3VLMoeModel(config)

    def build(self, examples: list) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
        batch["position_ids"] = self.positions.get_rope_index(**{k: batch.get(k) for k in keys})[0]
        return batch

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.build([train_example(step * self.size + j) for j in range(self.size)])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def answer_accuracy(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(accuracy, mean NLL) of the answer token, teacher-forced, over `batches` (prompts + answers)."""
    hits, nll, n = 0, 0.0, 0
    for batch in batches:
        logits = model(**batch, logits_to_keep=3).logits[:, 0].float()
        target = batch["input_ids"][:, -2]
        hits += int((logits.argmax(-1) == target).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += target.numel()
    return hits / n, nll / n


def sensitivity(model, batches: list[dict[str, torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """Answer-token accuracy and NLL of a bf16 copy of `model`, stock and with every MoE layer in nvfp4 / mxfp4."""
    from realb_hf import RealbConfig, apply_realb, get_runtime

    twin = copy.deepcopy(model).to(torch.bfloat16).eval()
    out = {"bf16": answer_accuracy(twin, batches)}
    apply_realb(twin, RealbConfig(policy="all_low", low_precision="nvfp4", batch_threshold=1))
    out["nvfp4 everywhere"] = answer_accuracy(twin, batches)
    get_runtime(twin).reconfigure(low_precision="mxfp4")
    out["mxfp4 everywhere"] = answer_accuracy(twin, batches)
    return out


def fingerprint(model) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal fingerprints, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def train(args) -> None:
    from transformers import Qwen3VLMoeForConditionalGeneration

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)  # the fingerprint shows whether it held
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer(vocabulary())
    processor = build_processor(tokenizer, IMAGE_SIZE)
    config = build_config(tokenizer)
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, equal_images_attention)
    model = Qwen3VLMoeForConditionalGeneration(config).float()
    model.set_attn_implementation({"vision_config": VISION_ATTENTION, "text_config": "eager"})
    model.set_experts_implementation(args.experts_implementation)
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({2 * n_params / 2**20:.1f} MiB in bf16), device {device}")

    collate = FastCollator(processor, IMAGE_SIZE)
    collate.check([train_example(i) for i in range(16)])
    batches = Batches(collate, build_config(tokenizer), args.batch)  # a config the model did not change
    held = heldout_set(args.check_n, seed=1)
    checks = [to_device(batches.build(held[i : i + 128]), device) for i in range(0, args.check_n, 128)]

    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(args.steps),  # index order: the same batches whatever the number of workers
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )
    opt, sched = make_optimizer(model, args.lr, args.steps)
    start = time.perf_counter()
    ema = None
    for step, batch in enumerate(loader):
        loss, total, logits, targets = answer_loss(model, to_device(batch, device))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            ema = loss.item() if ema is None else 0.8 * ema + 0.2 * loss.item()
            rate = (step + 1) / (time.perf_counter() - start)
            print(f"step {step:6d}  loss {ema:.3f}  lr {sched.get_last_lr()[0]:.1e}  {rate:.1f} steps/s", flush=True)
        last = step == args.steps - 1
        if args.check_every and ((step + 1) % args.check_every == 0 or last):
            row = sensitivity(model, checks)
            print(
                f"check @ {step + 1}: "
                + "  ".join(f"{k} {acc * 100:.1f}% nll {nll:.3f}" for k, (acc, nll) in row.items()),
                flush=True,
            )
    train_s = time.perf_counter() - start
    print(f"trained {args.steps} steps x {args.batch} examples in {train_s / 60:.1f} min on {device}")

    model = model.to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("grouped_mm")
    save(model, processor, args.out)
    print(f"weights fingerprint {fingerprint(model)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.sensitive.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to save the model (default: demo/sensitive/model)")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=256, help="examples per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1) - 1, help="data workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument(
        "--experts-implementation", default="grouped_mm", help="transformers experts kernel for training (eager: a loop)"
    )
    parser.add_argument("--check-every", type=int, default=400, help="steps between sensitivity checks (0: none)")
    parser.add_argument("--check-n", type=int, default=512, help="held-out (set 1) questions per check")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "check_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0 or args.check_every < 0:
        parser.error("--workers and --check-every must be >= 0")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: choose cuda, cuda:N, cpu or auto")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
