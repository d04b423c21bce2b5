"""Write the realb_synthetic data: demo/tasks.py's held-out questions as a parquet file with images (offline).

    python -m integrations.lmms_eval.tasks.realb_synthetic.make_data                   # data/ next to the YAMLs
    python -m integrations.lmms_eval.tasks.realb_synthetic.make_data --out /tmp/rs --n 64
        # /tmp/rs: a self-contained task folder (YAMLs + utils.py + data/) for lmms-eval's --include_path
    python -m integrations.lmms_eval.tasks.realb_synthetic.make_data --tasks demo.sensitive.tasks --out /tmp/rs
        # another task module's questions (a module name or a .py path, with demo/tasks.py's API)

Columns: id, kind, modality ("image"/"text"), question, answer, image (None for text questions). The defaults
(300 questions of held-out set 0) are the questions `python -m realb_hf.accuracy` scores, in the same order; with
`--tasks`, `--n` and `--seed` they are those of `python -m realb_hf.accuracy` given the same three.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
REPO = TASK_DIR.parents[3]
DATA_FILE = Path("data") / "realb_synthetic.parquet"
TASK_FILES = ("realb_synthetic.yaml", "realb_synthetic_mc.yaml", "utils.py")


def _task_module(tasks: str | Path | None):
    from realb_hf.accuracy import load_tasks

    if tasks is not None:
        return load_tasks(tasks=tasks)
    try:
        return load_tasks()
    except ImportError:  # `demo` is not importable from here: use the checkout's demo/tasks.py
        return load_tasks(tasks=REPO / "demo" / "tasks.py")


def build(out: str | Path | None = None, n: int = 300, seed: int = 0, tasks: str | Path | None = None) -> Path:
    """Write `<out>/data/realb_synthetic.parquet` (out=None: this task folder) and return the task folder.

    A folder other than this one also gets the task YAMLs and utils.py, so it can be passed to --include_path.
    """
    import datasets

    if n < 1:
        raise ValueError(f"n must be >= 1 question, got {n}")
    examples = _task_module(tasks).heldout_set(n, seed=seed)
    features = datasets.Features(
        {
            "id": datasets.Value("int32"),
            "kind": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "id": list(range(len(examples))),
            "kind": [ex.kind for ex in examples],
            "modality": [ex.modality for ex in examples],
            "question": [ex.question for ex in examples],
            "answer": [ex.answer for ex in examples],
            "image": [ex.image for ex in examples],
        },
        features=features,
    )
    folder = TASK_DIR if out is None else Path(out).resolve()
    if folder != TASK_DIR:
        folder.mkdir(parents=True, exist_ok=True)
        for name in TASK_FILES:
            shutil.copyfile(TASK_DIR / name, folder / name)
    (folder / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(folder / DATA_FILE))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="task folder to write (default: this one, data/ only)")
    parser.add_argument("--n", type=int, default=300, help="questions, balanced over the module's kinds (300)")
    parser.add_argument("--seed", type=int, default=0, help="held-out set (0)")
    parser.add_argument("--tasks", default=None, help="task module: a .py path or a module name such as demo.sensitive.tasks (default: demo/tasks.py)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1 question, got {args.n}")
    folder = build(args.out, args.n, args.seed, args.tasks)
    print(f"wrote {folder / DATA_FILE} ({args.n} questions); use it with --include_path {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
