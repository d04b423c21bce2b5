"""The package's structure rules, checked on its source: no import circles, kernels a leaf layer, no calls into
another object's private `_realb_*` methods, core files of one concept, nothing that points outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "realb_hf"
CORE_LINE_LIMIT = 450
EXEMPT_FROM_LIMIT = {"realb_hf/tiny.py"}  # a catalogue of tiny configs, not logic


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """realb_hf modules `path` imports, at module level or inside functions (a lazy import is still an edge)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("realb_hf")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("realb_hf"):
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in internal_imports(path):
            while target and target not in modules:  # a name imported from a module: the module
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                edges.add(target)
        graph[name] = edges
    return graph


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_kernels_import_nothing_above_them():
    for path in (PACKAGE / "kernels").rglob("*.py"):
        above = {t for t in internal_imports(path) if not t.startswith("realb_hf.kernels")}
        assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"


def test_telemetry_imports_no_kernel():
    assert not {t for t in internal_imports(PACKAGE / "telemetry.py") if t.startswith("realb_hf.kernels")}


def test_no_module_calls_another_objects_private_realb_methods():
    pattern = re.compile(r"[\w)\]]\._realb_\w+\(")
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "integrations").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                if not line[: match.start() + 1].rstrip().endswith(("self", "cls")):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_core_files_stay_small():
    long = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("realb_hf/bench/") or rel in EXEMPT_FROM_LIMIT:
            continue
        lines = len(path.read_text().splitlines())
        if lines > CORE_LINE_LIMIT:
            long.append(f"{rel}: {lines} lines")
    assert not long, "\n".join(long)


def test_nothing_refers_to_files_outside_the_repository():
    pattern = re.compile(r"FACTS\.md|ARCHITECTURE\.md|\.\./shared")
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "integrations").rglob("*"), *(ROOT / "demo").rglob("*.py"),
             *(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "model_card_template.md"]  # fmt: skip
    hits = [str(p.relative_to(ROOT)) for p in paths if p.is_file() and p.suffix in (".py", ".md")
            and pattern.search(p.read_text(errors="ignore"))]  # fmt: skip
    assert not hits, hits
