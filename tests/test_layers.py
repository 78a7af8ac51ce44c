"""The house's layering: algorithms never import Ray or the orchestration above them."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "raydd"

# package -> what it must never import (absolute module prefixes, resolved from relative imports too)
FORBIDDEN = {
    "raydd.methods": ("ray", "raydd.distillation", "raydd.evaluate", "raydd.pipeline", "raydd.cli",
                      "raydd.teachers", "raydd.services"),
    "raydd.models": ("ray", "raydd.distillation", "raydd.evaluate", "raydd.methods", "raydd.pipeline"),
    "raydd.data": ("ray", "raydd.distillation", "raydd.evaluate", "raydd.methods", "raydd.pipeline"),
    "raydd.augment": ("ray", "raydd.distillation", "raydd.evaluate", "raydd.methods"),
    "raydd.train": ("ray", "raydd.distillation", "raydd.evaluate", "raydd.methods"),
    "raydd.evaluate.protocol": ("ray", "raydd.distillation"),
    "raydd.distillation": ("raydd.evaluate",),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_layer(path):
    mod = _module(path)
    for owner, banned in FORBIDDEN.items():
        if mod == owner or mod.startswith(owner + "."):
            bad = sorted(i for i in _imports(path) for b in banned if i == b or i.startswith(b + "."))
            assert not bad, f"{mod} imports {bad}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 420, f"{path.name}: split it by concept"


def test_the_checker_sees_relative_imports():
    assert "raydd.distillation.plan" in _imports(ROOT / "distillation" / "worker.py")
    assert "raydd.methods" in _imports(ROOT / "distillation" / "worker.py")
