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


def define_op(
    name: str, schema: str, *, reference: Callable, fake: Callable, cuda: Callable | None = None
) -> torch._ops.OpOverload:
    """Register `realb_kernels::<name><schema>` and return the overload to call.

    `reference` runs on every device, `cuda` (when given) replaces it on CUDA, `fake` maps input metadata to
    empty outputs of the right shapes and dtypes."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        _LIBRARY.impl(name, cuda, "CUDA")
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
