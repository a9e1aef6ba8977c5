"""The import direction between the layers (docs/architecture.md, "Layers").

Every module under src/commit_mllm is parsed (ast; nothing is imported) and each import,
at the top or inside a function, is checked:

- the method (``commit_mllm/__init__.py`` and ``commit_mllm/method/``) imports only torch,
  the standard library and itself;
- a module imports from its own package or from a package of a lower rank, never from one
  of the same or a higher rank.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "commit_mllm"

# The rank of each layer; a module may import a package of a lower rank (or its own).
RANKS = {
    "method": 0,
    "data": 1,
    "models": 1,
    "formats": 2,
    "tasks": 2,
    "evaluation": 2,
    "parts": 3,
    "training": 4,
    "hf": 5,
    "reporting": 5,
    "cli": 7,
    "demo": 6,
}


def _modules() -> dict[str, Path]:
    """Every module's dotted name, ``commit_mllm.x.y``, with its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> str:
    """The layer of ``commit_mllm.x...``: its first package (the top-level is the method)."""
    parts = module.split(".")
    return "method" if len(parts) == 1 else parts[1]


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if node.module is None:  # from . import a, b: each a submodule or a name
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in _modules().items():
        layer = _layer(module)
        where = path.relative_to(SRC.parent)
        for line, name in _imports(module, path):
            top = name.split(".")[0]
            if top != "commit_mllm":
                if layer == "method" and top not in sys.stdlib_module_names and top != "torch":
                    bad.append(f"{where}:{line}: the method imports {name}")
                continue
            target = _layer(name)
            if target == layer:
                continue
            if RANKS[target] >= RANKS[layer]:
                bad.append(
                    f"{where}:{line}: {layer} (rank {RANKS[layer]}) imports {name} "
                    f"({target}, rank {RANKS[target]})"
                )
    return bad


def test_every_package_has_a_rank():
    layers = {_layer(module) for module in _modules()}
    assert layers == set(RANKS), "give each new package a rank here and in the doc"


def test_imports_run_down_the_layers_and_the_method_needs_only_torch():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checker itself: an upward import and a non-torch import in the method are caught."""
    src = tmp_path / "src"
    (src / "commit_mllm" / "method").mkdir(parents=True)
    (src / "commit_mllm" / "training").mkdir()
    (src / "commit_mllm" / "__init__.py").write_text("")
    (src / "commit_mllm" / "method" / "__init__.py").write_text("import numpy\n")
    (src / "commit_mllm" / "training" / "__init__.py").write_text("")
    (src / "commit_mllm" / "method" / "x.py").write_text("from ..training import train\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", src)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", src / "commit_mllm")
    bad = _violations()
    assert len(bad) == 2
    assert "the method imports numpy" in bad[0]
    assert "imports commit_mllm.training" in bad[1]
