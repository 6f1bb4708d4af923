"""The house's rules, enforced: the core never imports Ray, and nothing after stage 1 can reach
the real-data reader (the DP boundary). Imports are read from the source (AST, including
imports inside functions), so a lazy import cannot hide; a subprocess then imports the modules
for real and checks what got loaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradmm_ray"
REAL_DATA = "gradmm_ray.io.real_data"
# Stages 2 and 3 and what they hand to the user: they must see only the released targets.
AFTER_STAGE_ONE = (
    "gradmm_ray.distributed.solve",
    "gradmm_ray.distributed.select",
    "gradmm_ray.distill.output",
    "gradmm_ray.distill.report",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports anywhere in its source, as absolute names."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from gradmm_ray.core import lm` imports the module gradmm_ray.core.lm
            found |= {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
    return found


def reachable(start: str) -> set[str]:
    """The package's modules that ``start`` can import, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imports_of(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        todo = [m for m in todo if m in MODULES]
    return seen


def test_module_map_is_complete():
    """The walk sees the package's layers (a renamed folder would silently empty a check)."""
    for layer in ("core", "io", "distributed", "distill", "finetune"):
        assert any(m.startswith(f"gradmm_ray.{layer}.") for m in MODULES), layer
    assert REAL_DATA in MODULES and all(m in MODULES for m in AFTER_STAGE_ONE)


CORE = sorted(m for m in MODULES if m.startswith("gradmm_ray.core"))


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_ray(module):
    """No module under gradmm_ray/core imports ray, directly or through another module."""
    for dependency in reachable(module):
        bad = {name for name in imports_of(dependency) if name.split(".")[0] == "ray"}
        assert not bad, f"{module} reaches {dependency}, which imports {sorted(bad)}"


@pytest.mark.parametrize("module", AFTER_STAGE_ONE)
def test_nothing_after_stage_one_can_reach_the_real_data_reader(module):
    """Stages 2 and 3 (and the output they write) cannot import the real-data reader, through
    any chain of imports."""
    assert REAL_DATA not in reachable(module), f"{module} can reach {REAL_DATA}"


def test_the_checks_can_fail():
    """The walk finds what it must: stage 1 reaches the reader, and the Ray layer reaches ray."""
    assert REAL_DATA in reachable("gradmm_ray.distributed.targets")
    assert "ray" in {n.split(".")[0] for n in imports_of("gradmm_ray.distributed.ray_env")}


def test_imported_for_real():
    """Importing the whole core and the later stages loads neither ray nor the reader."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE + list(AFTER_STAGE_ONE[2:]))
        + f"bad = [m for m in ('ray', {REAL_DATA!r}) if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
