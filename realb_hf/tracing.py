"""Which tracer runs this code: torch.export or not.

`torch.compiler.is_exporting()` is the public question, but dynamo in torch 2.11 folds it to True in every trace,
torch.compile's included (its table of tracing-state functions answers True for all of them; later torch reads the
flag behind it instead). Code that branches on it would then take its export path under torch.compile: ReaLB's
host decision would raise the export error where compiled code breaks the graph. So the flag is read directly
where torch has it: dynamo reads a module global's value while tracing and guards on it (checked on torch 2.13;
not yet run on 2.11).
"""

from __future__ import annotations

import torch


def exporting() -> bool:
    """Whether torch.export is tracing this call; False under torch.compile and in eager code."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)  # torch.compiler.is_exporting() returns it
    return torch.compiler.is_exporting() if flag is None else bool(flag)
