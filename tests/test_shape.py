"""The package's shape: layers import only downwards, no cycles, no private cross-imports, small
files and functions, and the pure layers import without the native extension."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "headprune"

#: layer of each subpackage / top-level module; a module may import its own package and lower
#: layers only (same-rank packages stay independent of each other)
LAYERS = {"core": 0, "atomic": 0, "stats": 1, "ranking": 2, "prune": 2, "plain": 3, "hf": 4, "distributed": 5,
          "app": 6}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # without its docstring


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name: str, path: Path):
    """``(imported module, [names], line)`` of every import of a headprune module, function-level
    ones included."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("headprune"):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("headprune"):
                names = [a.name for a in node.names]
                # "from . import x" imports the submodule x
                subs = [f"{target}.{n}" for n in names if (PACKAGE.parent / (f"{target}.{n}".replace(".", "/"))).exists()
                        or (PACKAGE.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
                yield (target, names, node.lineno) if not subs else None
                for s in subs:
                    yield s, [], node.lineno


def _layer(module: str):
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package facade, headprune/__init__.py
    return LAYERS.get(parts[1])


def test_layers_import_only_downwards_and_nothing_private():
    bad = []
    for name, path in _modules():
        mine = _layer(name)
        if mine is None or name.endswith("._build_info"):
            continue
        for item in _imports(name, path):
            if item is None:
                continue
            target, names, line = item
            theirs = _layer(target)
            if target == "headprune._C" or target.startswith("headprune._build_info"):
                continue
            same_package = target.split(".")[:2] == name.split(".")[:2]
            if theirs is None:
                bad.append(f"{name}:{line} imports the facade {target}")
            elif theirs > mine or (theirs == mine and not same_package):
                bad.append(f"{name}:{line} (layer {mine}) imports {target} (layer {theirs})")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and not same_package:
                bad.append(f"{name}:{line} imports private {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {}
    for name, path in _modules():
        graph[name] = {item[0] for item in _imports(name, path) if item is not None}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen or node not in graph:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package importing its own submodules (its facade) is not a cycle of layers
            if not nxt.startswith(node + "."):
                visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _function_lines(node) -> int:
    lines = node.end_lineno - node.lineno + 1
    doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
    if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        lines -= doc.end_lineno - doc.lineno + 1
    return lines


def test_files_and_functions_stay_small():
    bad = []
    for folder in (PACKAGE, ROOT / "benchmarks", ROOT / "tests"):
        for path in sorted(folder.rglob("*.py")):
            text = path.read_text()
            if len(text.splitlines()) > MAX_FILE_LINES:
                bad.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _function_lines(node) > MAX_FUNCTION_LINES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {_function_lines(node)} lines")
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh") and len(path.read_text().splitlines()) > MAX_FILE_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {len(path.read_text().splitlines())} lines")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("code", [
    "import headprune, headprune.ranking, headprune.stats, headprune.prune",
    "from headprune import HeadScores, select_heads; from headprune.core import reference, schema",
])
def test_pure_layers_import_without_the_extension(code):
    """With ``headprune._C`` unimportable, the pure layers still import and work; the first op
    call says the extension is missing."""
    script = f"""
import sys
sys.modules["headprune._C"] = None  # as if never built
{code}
from headprune import HeadScores, select_heads
import torch
s = HeadScores.empty([4, 4], [4, 4], [8, 8], ["0", "1"], ["self", "self"])
s.stats[..., 0] = 1
s.stats[..., 1] = torch.rand(2, 4)
s = HeadScores.from_dict(s.to_dict())
assert select_heads(s, count=2, score="entropy") == select_heads(s, count=2, score="entropy")
assert "headprune._C" not in sys.modules or sys.modules["headprune._C"] is None
from headprune.core import ops
try:
    ops.entropy_stats_from_probs_accumulate_(torch.zeros(1, 6, dtype=torch.float64), torch.ones(1, 1, 1, 1))
except ImportError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: headprune._C failed to load" in out.stdout
