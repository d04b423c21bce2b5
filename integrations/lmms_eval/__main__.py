"""lmms-eval's CLI with the `realb` model registered and this integration's tasks on the include path.

    python -m integrations.lmms_eval --model realb --tasks realb_synthetic --batch_size 8 --output_path logs \\
        --model_args pretrained=demo/model,policy=realb,low_precision=fp8,ep_size=4,batch_threshold=0

Every lmms-eval flag works as with `lmms-eval` (`--include_path` adds to this package's task folder). Beyond plain
lmms-eval, the results JSON gets a "realb" entry (the telemetry summary and the telemetry files' paths) and the
telemetry files land next to it.
"""

from __future__ import annotations

import functools
import sys

from . import TASKS_DIR, register, require_lmms_eval


def _with_realb_results(simple_evaluate):
    @functools.wraps(simple_evaluate)
    def wrapped(*args, **kwargs):
        from .models import realb as realb_model

        cli_args = kwargs.get("cli_args")
        realb_model.CLI_OUTPUT_PATH = getattr(cli_args, "output_path", None)
        realb_model.CLI_DATETIME_STR = kwargs.get("datetime_str")
        first = len(realb_model.FINISHED)
        try:
            results = simple_evaluate(*args, **kwargs)
        finally:
            realb_model.CLI_OUTPUT_PATH = realb_model.CLI_DATETIME_STR = None
        finished = realb_model.FINISHED[first:]
        if isinstance(results, dict) and finished:
            results["realb"] = finished[0] if len(finished) == 1 else finished
        return results

    return wrapped


def main(argv: list[str] | None = None) -> None:
    require_lmms_eval()
    cli = require_lmms_eval("lmms_eval.__main__")
    evaluator = require_lmms_eval("lmms_eval.evaluator")
    register()
    sys.argv = [sys.argv[0] if sys.argv else "lmms-eval", *(sys.argv[1:] if argv is None else argv)]
    _, args = cli.parse_eval_args()
    include = args.include_path
    args.include_path = [include, str(TASKS_DIR)] if include else str(TASKS_DIR)
    if not getattr(evaluator.simple_evaluate, "_realb_wrapped", False):
        evaluator.simple_evaluate = _with_realb_results(evaluator.simple_evaluate)
        evaluator.simple_evaluate._realb_wrapped = True
    cli.cli_evaluate(args)


if __name__ == "__main__":
    main()
