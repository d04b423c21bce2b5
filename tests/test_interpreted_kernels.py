"""The routing kernels run through Triton's interpreter on the CPU and equal their torch references exactly.

The interpreter runs one program at a time, so this checks the kernels' arithmetic and indexing (the counting
sort, the last-block hand-off, the decision), not their concurrency: `test_routing_kernels.py` does that on a GPU.
It needs `TRITON_INTERPRET=1` before triton is imported, so the checks run in a child process.
"""

import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_routing_kernels_equal_their_references_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checked" in done.stdout


def _on_gpu(fn):
    """`fn` with its tensor arguments moved to the GPU and its results brought back."""
    import torch

    def move(x, device):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, tuple):
            items = [move(v, device) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
        return x

    def run(*args, **kwargs):
        out = fn(*(move(a, "cuda") for a in args), **{k: move(v, "cuda") for k, v in kwargs.items()})
        return move(out, "cpu")

    return run


def test_routing_kernels_equal_their_references_compiled_on_the_gpu(monkeypatch):
    """The same checks with the kernels compiled for the GPU (the interpreter emulates what a compile can differ on)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from realb_hf.kernels import counts, exchange, sort

    for module, name in ((counts, "counts_triton"), (counts, "lowered_flags_triton"),
                         (exchange, "exchange_counts_triton"), (sort, "sort_rows_triton")):  # fmt: skip
        monkeypatch.setattr(module, name, _on_gpu(getattr(module, name)))
    assert (_check_sort_rows(), _check_decisions(), _check_counts_and_flags(), _check_exchange_counts()) == (
        5, 120, 12, 64
    )


def _allow_scalar_loop_bounds() -> None:
    """Triton 3.6's interpreter passes scalar arguments as one-element arrays, which `range` cannot take as a
    bound; compiled kernels take them. Make `__index__` read the element."""
    import numpy as np
    import triton.runtime.interpreter as interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a later Triton reorganised its interpreter; it may take scalar bounds as they are
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _check_sort_rows() -> int:
    import torch

    from realb_hf.kernels.sort import sort_rows, sort_rows_triton

    # (tokens, top_k, experts); the last block scans the others 2 at a time, so 5 blocks take it 3 steps
    cases = [(1, 1, 4), (300, 8, 32), (501, 6, 18), (0, 8, 8), (2500, 2, 8)]
    for seed, (tokens, top_k, num_experts) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, num_experts + 1, (tokens, top_k), generator=gen)  # num_experts: another rank's
        low = torch.rand(num_experts, generator=gen) < 0.5
        hidden = torch.randn(tokens, 40, generator=gen).bfloat16()
        if tokens > 5:
            hidden[3, 7], hidden[4, 0] = float("inf"), float("nan")
        ref = sort_rows(ids, low, hidden, num_experts)
        got = sort_rows_triton(ids.reshape(-1), top_k, low, hidden, num_experts, block_tile=2)
        for name, g, r in zip(ref._fields, got, ref):
            assert torch.equal(g.long(), r.long()), (tokens, top_k, num_experts, name)
    return len(cases)


def _check_decisions() -> int:
    import torch

    from realb_hf.kernels.counts import lowered_flags_triton
    from realb_hf.policy import PolicyParams, lowered_experts_on_device

    rng = random.Random(0)
    for trial in range(120):
        ep, per = rng.choice([1, 2, 4, 8]), rng.choice([1, 3, 16, 18])
        tokens = torch.tensor([rng.choice([0, rng.randint(0, 3000)]) for _ in range(ep * per)])
        tokens[: per * rng.randint(0, 1)] *= rng.choice([1, 3])
        share = torch.tensor([rng.choice([rng.random(), 1.0, 0.9]) for _ in range(ep * per)])
        counts = torch.stack([tokens, (tokens.double() * share).long()]).int()
        params = PolicyParams(
            ep_size=ep,
            granularity=rng.choice(["rank", "expert"]),
            modality_threshold=rng.choice([0.0, 0.5, 0.7]),
            imbalance_threshold=rng.choice([0.0, 0.1, 0.3]),
            low_cost_ratio=rng.choice([None, 0.5, 0.78]),
            conversion_cost=rng.choice([0.0, 40.0, 512.0]),
        )
        out = lowered_flags_triton(counts, params.device_rule())
        assert torch.equal(out, lowered_experts_on_device(counts, 4096, params)), (trial, counts, params)
    return 120


def _check_counts_and_flags() -> int:
    import torch

    from realb_hf.kernels.counts import counts_and_flags, counts_triton
    from realb_hf.modality import TEXT
    from realb_hf.policy import PolicyParams

    rng = random.Random(1)
    for trial in range(12):
        ep = rng.choice([2, 4])
        num_experts, top_k, tokens = ep * 4, 2, rng.choice([300, 1500])  # 1500 tokens: 3 blocks of rows
        gen = torch.Generator().manual_seed(trial)
        ids = torch.randint(0, num_experts, (tokens, top_k), generator=gen)
        ids = torch.where(torch.rand(tokens, top_k, generator=gen) < 0.5, ids % 4, ids)  # rank 0 hot
        modality = (torch.rand(tokens, generator=gen) < 0.8).to(torch.int8)
        rule = PolicyParams(ep_size=ep, granularity=rng.choice(["rank", "expert"])).device_rule()
        ref_counts, ref_flags = counts_and_flags(ids, modality, num_experts, rule, TEXT)
        counts, flags = counts_triton(ids, modality, num_experts, TEXT, rule)
        assert torch.equal(counts.long(), ref_counts.long()) and torch.equal(flags, ref_flags), (trial, rule)
    return 12


def _check_exchange_counts() -> int:
    """EP all-to-all's count vector: counts, rows and the fp8 finite flag from one launch, as the reference."""
    import torch

    from realb_hf.kernels.exchange import exchange_counts, exchange_counts_triton
    from realb_hf.modality import TEXT

    # (tokens, top_k, experts): 700 x 3 pairs take 3 count blocks, 44 check blocks; 0 tokens launch nothing
    cases = [(700, 3, 12), (5, 8, 8), (0, 2, 4), (40, 1, 6)]
    n = 0
    for seed, (tokens, top_k, num_experts) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, num_experts + 2, (tokens, top_k), generator=gen)  # ids >= E: other ranks'
        modality = torch.randint(0, 3, (tokens,), dtype=torch.int8, generator=gen)
        hidden = torch.randn(tokens, 40, generator=gen).bfloat16()
        for bad in (None, float("inf"), float("nan"), 2.0**101):
            if bad is not None and tokens:
                hidden = hidden.clone()
                hidden[tokens - 1, 39] = bad  # the last row and column: the masks must reach them
            for mod in (modality, None):
                for check in (True, False):
                    ref = exchange_counts(ids, mod, hidden, num_experts, TEXT, check)
                    got = exchange_counts_triton(ids, mod, hidden, num_experts, TEXT, check)
                    assert torch.equal(got.long(), ref.long()), (tokens, top_k, num_experts, bad, check, got, ref)
                    n += 1
    return n


if __name__ == "__main__":
    _allow_scalar_loop_bounds()
    sorts, decisions, both = _check_sort_rows(), _check_decisions(), _check_counts_and_flags()
    exchanges = _check_exchange_counts()
    print(f"checked {sorts} sorts, {decisions} decisions, {both} counts with their decision, {exchanges} count exchanges")
