"""docs/architecture.md's module map names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchscore"


def documented() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, flags=re.M)}


def modules() -> set[str]:
    """Every module of the package, by its path under batchscore/ (a subpackage's
    `__init__.py`, which holds only its docstring, is named by the subpackage's row)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("demo/"):
            found.add("demo/")
        elif rel.endswith("/__init__.py"):
            continue
        else:
            found.add(rel)
    return found


def test_the_module_map_names_every_module_and_nothing_else():
    doc, code = documented(), modules()
    assert not code - doc, f"modules missing from docs/architecture.md's module map: {sorted(code - doc)}"
    assert not doc - code, f"docs/architecture.md names modules the package does not have: {sorted(doc - code)}"


def test_each_subpackage_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        text = init.read_text()
        assert text.startswith('"""') and len(text) > 80, f"{init}: a docstring saying what the subpackage holds"
        names = {p.stem for p in init.parent.glob("*.py")} - {"__init__"}
        if init.parent.name != "demo":
            assert all(f"`{n}`" in text for n in names), f"{init}: name each of its modules {sorted(names)}"
