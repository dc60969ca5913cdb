"""The arrows of the architecture point one way (the map in CONTRIBUTING.md), checked by parsing every import in
``src/`` (function-level ones included): the core never imports the CPU wing, the method never imports the
machinery around it, data and tools never import the model side, and no library code imports an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
ENTRY_POINTS = ("src.train", "src.eval")


def imported(path: Path) -> set[str]:
    """The ``src.*`` modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "src" or m.startswith("src.")}


def where(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


RULES = [
    # (files the rule is about, packages they may not import, why)
    (lambda m: not under(m, "src.accel"), ("src.accel",),
     "the core never imports the CPU wing: the accel config group plugs it in behind the seams"),
    (lambda m: under(m, "src.modules.method"), ("src.modules.distill", "src.modules.rollout", "src.modules.models",
                                                 "src.modules.evaluation", "src.modules.scoring", "src.datamodules",
                                                 "src.callbacks", "src.tools"),
     "the method is math over tensors and rollouts it is handed"),
    (lambda m: under(m, "src.datamodules"), ("src.modules", "src.callbacks", "src.accel"),
     "data never imports the model side"),
    (lambda m: under(m, "src.tools"), ("src.modules", "src.datamodules", "src.callbacks", "src.accel"),
     "the tool layer sits below the rollouts and the data that use it"),
    (lambda m: m not in ENTRY_POINTS, ENTRY_POINTS, "library code never imports an entry point"),
]


@pytest.mark.parametrize("rule", range(len(RULES)))
def test_imports_point_one_way(rule):
    applies, forbidden, why = RULES[rule]
    wrong = [f"{where(p)} imports {m}" for p in FILES if applies(where(p)) for m in sorted(imported(p))
             if under(m, *forbidden)]
    assert not wrong, f"{why}:\n  " + "\n  ".join(wrong)


def test_the_rules_see_the_imports_they_check():
    """Not vacuous: the parser finds the wing's own imports of the core, and every file is parsed."""
    assert len(FILES) > 50
    assert "src.modules.rollout.decode" in imported(SRC / "accel" / "cpu" / "decode_step.py")
    assert "src.modules.scoring" in imported(SRC / "accel" / "cpu" / "backbone.py")
    assert any(under(m, "src.modules.method") for m in imported(SRC / "modules" / "distill.py"))
