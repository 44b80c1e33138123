"""Imports point one way: ``accounting`` imports nothing of ours, ``dpfed`` imports ``accounting``, ``attacks``
imports both. Only the composition roots (the command line, the Flower apps) may import ``attacks``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (``if TYPE_CHECKING:`` blocks are for type checkers only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


# the composition roots: the command line and the two Flower apps build the audit plan they run with
ENTRY_POINTS = ("dpfed/cli", "dpfed/flower/server_app.py", "dpfed/flower/client_app.py")


@pytest.mark.parametrize("package, forbidden, allowed", [
    ("accounting", {"dpfed", "attacks"}, ()),
    ("dpfed", {"attacks"}, ENTRY_POINTS),
])
def test_imports_point_one_way(package, forbidden, allowed):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == a or rel.startswith(a + "/") for a in allowed):
            continue
        hit = _imports(path) & forbidden
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_privacy_and_model_do_not_import_the_adapters_package():
    for name in ("privacy.py", "model.py"):
        mods = set()
        for node in ast.walk(ast.parse((ROOT / "dpfed" / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
        assert not any(m.startswith("dpfed.adapters") for m in mods), (name, sorted(mods))
