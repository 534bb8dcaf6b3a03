"""The house's walls: the public averaging core (swa_research.averaging, docs/library.md) is a
library of its own. It imports nothing of the framework (its config and OmegaConf, its data
layer, its process groups, its trainer), so that a researcher's own loop, Lightning module or
language model uses it without them; the framework builds on the core, not the other way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import swa_research

CORE = Path(swa_research.__file__).parent / "averaging"
# What the core may import of the project: itself, and the one-line error type (a plain
# Exception subclass in a module that imports nothing at its top).
ALLOWED = ("swa_research.averaging", "swa_research.errors")


def project_imports(path: Path) -> list[tuple[int, str]]:
    """Every swa_research module a file imports (at its top, in functions, under
    TYPE_CHECKING), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] == "swa_research"]
    return found


def test_no_file_of_the_core_imports_the_framework() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 10
    wrong = [f"{f.name}:{line} imports {name}" for f in files
             for line, name in project_imports(f)
             if not any(name == a or name.startswith(a + ".") for a in ALLOWED)]
    assert not wrong, "; ".join(wrong)


def test_importing_the_core_loads_nothing_of_the_framework() -> None:
    """In a fresh interpreter: the modules loaded by ``import swa_research.averaging``."""
    code = ("import sys, swa_research.averaging; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('swa_research', "
            "'omegaconf', 'hydra', 'wandb')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "swa_research.averaging.library" in out  # the check sees the core
    outside = [m for m in out if not any(m == a or m.startswith(a + ".") for a in ALLOWED)
               and m != "swa_research"]
    assert outside == []


def test_the_walk_sees_an_import_of_the_framework(tmp_path: Path) -> None:
    """The walk itself: an import inside a function and one under TYPE_CHECKING are found."""
    f = tmp_path / "probe.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from swa_research.data import ImageSet\n"
                 "def g():\n    import swa_research.config as c\n    return c\n")
    assert project_imports(f) == [(3, "swa_research.data"), (5, "swa_research.config")]
