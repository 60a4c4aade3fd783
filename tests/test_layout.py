"""The floor plan (docs/design.md, layout): each floor imports only the floors below it.

A static walk (ast, no import runs) over every .py file under rlhf/ and stages/, lazy imports inside functions
included. It fails on
- an import loop between modules;
- a core module (rlhf/ outside rlhf/cli/) importing the front (rlhf.cli), click, or a stage (rlhf.stages.X);
  the stage table itself (package rlhf.stages, strings only) may be read by the core;
- a stage importing another stage, or the stage table importing a stage module.
stages/ is installed as the package rlhf.stages (pyproject.toml), so `stages.X` and `rlhf.stages.X` are one module.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONT = "rlhf.cli"
TABLE = "rlhf.stages"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for rlhf/**.py and stages/*.py (stages/ as rlhf.stages)."""
    out = {}
    for top, package in (("rlhf", "rlhf"), ("stages", "rlhf.stages")):
        for f in sorted((root / top).rglob("*.py")):
            parts = list(f.relative_to(root / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _canonical(name: str) -> str:
    return "rlhf." + name if name == "stages" or name.startswith("stages.") else name


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file): internal ones resolved to a module of ``modules``
    (``from pkg import sub`` is pkg.sub when that is a module), external ones as written."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_canonical(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = _canonical(node.module)
            subs = {f"{mod}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {mod}
            if subs and len(subs) < len(node.names):
                found.add(mod)  # names from the package itself as well
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def is_stage(name: str) -> bool:
    return name.startswith(TABLE + ".")


def is_front(name: str) -> bool:
    return name == FRONT or name.startswith(FRONT + ".") or name == "rlhf.__main__"  # `python -m rlhf` is the CLI


def loops(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (or a module importing itself), Tarjan's algorithm."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v] & set(g)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in g[v]:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def violations(root: Path = ROOT) -> list[str]:
    g = graph(root)
    bad = [f"import loop: {' <-> '.join(group)}" for group in loops(g)]
    for name, deps in sorted(g.items()):
        for dep in sorted(deps):
            if is_front(name):
                continue
            if dep == "click" or dep.startswith("click."):
                bad.append(f"{name} imports click: only the front (rlhf/cli/) knows click")
            elif is_front(dep):
                bad.append(f"{name} imports {dep}: nothing below the front imports it")
            elif is_stage(dep) and not is_stage(name):
                what = "the stage table" if name == TABLE else "the core"
                bad.append(f"{name} imports the stage {dep}: {what} knows no stage (the table holds names only)")
            elif is_stage(dep) and is_stage(name) and dep != name:
                bad.append(f"{name} imports the stage {dep}: no stage imports another (share code through the core)")
    return bad


def test_the_walk_sees_the_floors():
    g = graph()
    assert {"rlhf.cli", "rlhf.loader", "rlhf.stages", "rlhf.stages.sft", "rlhf.stages.ppo"} <= set(g)
    assert "rlhf.stages" in g["rlhf.cli"] and "click" in g["rlhf.cli"]  # the CLI reads the table and knows click
    assert any(is_stage(d) for d in g["rlhf.cli.pipeline"]) or "rlhf.stages" in g["rlhf.cli.pipeline"]
    assert "rlhf.loader" in g["rlhf.stages.sft"]  # lazy imports inside functions are seen


def test_layout_has_no_loop_and_each_floor_imports_only_those_below():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_a_violation_is_reported(tmp_path):
    for top, files in {"rlhf": {"__init__.py": "", "a.py": "import click\nfrom rlhf import b\n",
                                "b.py": "def f():\n    from rlhf.a import x\n",
                                "c.py": "from rlhf.stages.s1 import run\n",
                                "cli/__init__.py": "import click\nfrom rlhf.stages import STAGES\n"},
                       "stages": {"__init__.py": "", "s1.py": "from . import s2\n",
                                  "s2.py": "from rlhf.cli import main\n"}}.items():
        for rel, text in files.items():
            (tmp_path / top / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / top / rel).write_text(text)
    bad = violations(tmp_path)
    assert "import loop: rlhf.a <-> rlhf.b" in bad
    assert "rlhf.a imports click: only the front (rlhf/cli/) knows click" in bad
    assert any(b.startswith("rlhf.c imports the stage rlhf.stages.s1") for b in bad)
    assert any(b.startswith("rlhf.stages.s1 imports the stage rlhf.stages.s2") for b in bad)
    assert "rlhf.stages.s2 imports rlhf.cli: nothing below the front imports it" in bad
    assert not any(b.startswith("rlhf.cli ") for b in bad)
