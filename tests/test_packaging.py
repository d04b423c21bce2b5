"""What a non-editable install carries: every realb_hf subpackage, the card template, the demo and its model.

The wheel is built here without network (the current environment's setuptools) from a copy of the sources, and
imported from its unpacked files with the checkout off sys.path. .ci/run also installs it into a fresh venv and
runs `realb-hf save` and the demo from there.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
setuptools = pytest.importorskip("setuptools")


def test_every_realb_hf_subpackage_is_in_the_package_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(setuptools.find_packages(str(ROOT), include=["realb_hf", "realb_hf.*"]))
    assert set(config["packages"]) == found | {"realb_hf.demo"}, "add new subpackages to pyproject.toml"
    assert config["package-dir"] == {"realb_hf.demo": "demo"}


INSTALLED_CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import realb_hf
from realb_hf.accuracy import load_tasks
from realb_hf.bundled import bundled_model_dir, demo_dir, demo_module
from realb_hf.hub import find_template
tasks = load_tasks()
app = demo_module("app")
train = demo_module("train")
for path in (realb_hf.__file__, find_template(), demo_dir(), tasks.__file__, app.__file__, train.__file__):
    assert Path(path).resolve().is_relative_to(site), path
assert app.__name__ == "realb_hf.demo.app" and train.heldout_set is tasks.heldout_set
assert (bundled_model_dir() / "model.safetensors").stat().st_size > 1_000_000
assert len(tasks.heldout_set(4)) == 4
print("ok")
"""


@pytest.mark.slow
def test_the_wheel_carries_the_template_and_the_demo(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "model_card_template.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "realb_hf", source / "realb_hf", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "demo", source / "demo", ignore=ignore)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("realb_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("realb_hf/model_card_template.md", "realb_hf/demo/app.py", "realb_hf/demo/tasks.py"):
        assert name in names
    assert {f"realb_hf/demo/model/{f.name}" for f in (ROOT / "demo" / "model").iterdir()} <= set(names)
    tops = {n.split("/")[0] for n in names}  # nothing but the package (no top-level `demo` in site-packages)
    assert tops == {"realb_hf", next(t for t in tops if t.startswith("realb_hf-") and t.endswith(".dist-info"))}

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK, str(site)], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-3000:]
