"""The `realb_kernels` operator namespace: the layer's kernels are called through registered torch operators.

Each operator has a schema, the torch reference as its kernel on every device, the Triton kernel on CUDA (where
Triton is installed) and a fake implementation that states its outputs' shapes and dtypes from its inputs'
alone. torch.compile therefore traces a call as one opaque node, and a CUDA graph captures its launches. The
operators follow three rules:
- no Python number is read back from a tensor: device-side counts and offsets stay tensors;
- every output is a tensor: an output that does not apply is an empty tensor, mapped to None by the wrapper;
- autograd falls through them: their outputs track gradients exactly as their kernels' own ops do, so a Triton
  kernel's outputs never require grad, as with a direct launch, and callers that check whether gradients flow
  see the same answer either way.

Operators are defined with `torch.library.Library` rather than `torch.library.custom_op`: custom_op adds a
Python autograd layer to every call (host time on each of a layer's launches) and marks every output as
requiring grad once an input does. The namespace is not `realb`: profiler labels of a layer's stages start
with `realb::`, and an operator's profiler events carry its qualified name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "realb_kernels"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: dropping it unregisters the operators


class KernelOp:
    """A registered operator and its implementations. Code being compiled calls the operator (one opaque graph
    node); eager code calls the implementation for its first argument's device (a tensor in every operator here)
    directly, as the dispatcher would, without the host time of boxing every argument on each of a layer's
    launches. Both run the same function, so eager and compiled results are the same."""

    __slots__ = ("op", "reference", "cuda")

    def __init__(self, op: torch._ops.OpOverload, reference: Callable, cuda: Callable | None):
        self.op, self.reference, self.cuda = op, reference, cuda

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if self.cuda is not None and args[0].is_cuda:
            return self.cuda(*args)
        return self.reference(*args)


def define_op(
    name: str, schema: str, *, reference: Callable, fake: Callable, cuda: Callable | None = None
) -> KernelOp:
    """Register `realb_kernels::<name><schema>` and return it with its implementations.

    `reference` runs on every device, `cuda` (when given) replaces it on CUDA, `fake` maps input metadata to
    empty outputs of the right shapes and dtypes."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        _LIBRARY.impl(name, cuda, "CUDA")
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
    return KernelOp(getattr(getattr(torch.ops, NAMESPACE), name).default, reference, cuda)
