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

Compiled code on CUDA can call a second form of an operator where one is given, `<name>_traceable`: a
`torch.library.triton_op` whose body is the CUDA implementation with its launches wrapped by
`torch.library.wrap_triton`. Inductor traces that body, so its generated code allocates the outputs and launches
the Triton kernels itself instead of calling into Python for every launch (the host time an opaque operator costs
each time compiled code runs). Its grid is fixed when the body is traced (`rows.background` shares apply to eager
calls). Opt-in and experimental: `REALB_TRACEABLE_KERNELS` (a comma-separated list of operator names, or `all`)
or `use_traceable` turns it on; docs/compile.md says what has been measured of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

NAMESPACE = "realb_kernels"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: dropping it unregisters the operators
TRACEABLE_ENV = "REALB_TRACEABLE_KERNELS"
TRACEABLE: list[str] = []  # operators with a traceable form, in definition order
_traced: frozenset[str] = frozenset()  # those compiled code calls in that form (`use_traceable`)


def traceable_names(value: str | None = None) -> frozenset[str]:
    """The operators `REALB_TRACEABLE_KERNELS` (or `value`) names, checked against those with a traceable form;
    `all` names every one."""
    value = os.environ.get(TRACEABLE_ENV, "") if value is None else value
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    if names == {"all"}:
        return frozenset(TRACEABLE)
    _check_traceable(names, f"{TRACEABLE_ENV}={','.join(sorted(names))!r} names")
    return names


def use_traceable(names: frozenset[str]) -> frozenset[str]:
    """Compile the operators `names` (from `traceable_names`) in their traceable form in code traced from now on;
    returns the previous set."""
    global _traced
    _check_traceable(names, "use_traceable got")
    previous, _traced = _traced, frozenset(names)
    return previous


def _check_traceable(names: frozenset[str], what: str) -> None:
    unknown = sorted(set(names) - set(TRACEABLE))
    if unknown:
        raise ValueError(
            f"{what} {unknown}, which have no traceable form; allowed: 'all' or a comma-separated list of {TRACEABLE}"
        )


class KernelOp:
    """A registered operator and its implementations. Code being compiled calls the operator (one opaque graph
    node), or on CUDA its traceable form where `use_traceable` turned that on; eager code calls the
    implementation for its first argument's device (a tensor in every operator here) directly, as the dispatcher
    would, without the host time of boxing every argument on each of a layer's launches. All run the same kernels,
    so eager and compiled results are the same."""

    __slots__ = ("name", "op", "reference", "cuda", "traceable")

    def __init__(
        self,
        name: str,
        op: torch._ops.OpOverload,
        reference: Callable,
        cuda: Callable | None,
        traceable: Callable | None = None,
    ):
        self.name, self.op, self.reference, self.cuda, self.traceable = name, op, reference, cuda, traceable

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            if self.traceable is not None and self.name in _traced and args[0].is_cuda:
                return self.traceable(*args)
            return self.op(*args)
        if self.cuda is not None and args[0].is_cuda:
            return self.cuda(*args)
        return self.reference(*args)


def define_op(
    name: str,
    schema: str,
    *,
    reference: Callable,
    fake: Callable,
    cuda: Callable | None = None,
    traceable: Callable | None = None,
) -> KernelOp:
    """Register `realb_kernels::<name><schema>` and return it with its implementations.

    `reference` runs on every device, `cuda` (when given) replaces it on CUDA, `fake` maps input metadata to
    empty outputs of the right shapes and dtypes. `traceable` (typed like the schema, its launches wrapped by
    `wrap_triton`) becomes `realb_kernels::<name>_traceable`, what compiled code calls on CUDA once
    `use_traceable` names `name`."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        _LIBRARY.impl(name, cuda, "CUDA")
    _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
    traced = None
    if traceable is not None:
        TRACEABLE.append(name)
        traced = torch.library.triton_op(f"{NAMESPACE}::{name}_traceable", traceable, mutates_args=())
    return KernelOp(name, getattr(getattr(torch.ops, NAMESPACE), name).default, reference, cuda, traced)
