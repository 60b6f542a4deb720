"""The import layering of docs/architecture.md, read from the source (ast), nothing imported:

- the shared core (``reft_edge/`` but the commands) imports no stage;
- the runtime (``runtime/``, import name ``reft_edge.runtime``) imports neither training nor export,
  at module level or lazily inside a function;
- no stage imports the commands above them (the reft_edge.cli package, reft_edge.evaluate);
- no import cycle among modules at module level (lazy imports inside functions may close one).

Imports under ``if TYPE_CHECKING:`` never run and those under ``if __name__ == "__main__":`` run only
when the module is the script (then it is the top), so neither counts.

pyproject.toml maps the folders to import names: train/ -> reft_edge.train, export/ ->
reft_edge.export, runtime/ -> reft_edge.runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "reft_edge": "reft_edge",
    "train": "reft_edge.train",
    "export": "reft_edge.export",
    "runtime": "reft_edge.runtime",
}
STAGES = ("reft_edge.train", "reft_edge.export", "reft_edge.runtime")


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "node_modules" in parts:
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()
# The top of the house, above every stage: the reft_edge.cli package (the `reft-edge` command, one module
# per stage) and reft_edge.evaluate. They may import anything (lazily, so --help stays light).
COMMANDS = {name for name in MODULES if name == "reft_edge.cli" or name.startswith("reft_edge.cli.")}
COMMANDS.add("reft_edge.evaluate")


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None for a third-party one."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported project module, at module level) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), top)  # type-only imports never run
            elif isinstance(child, ast.If) and ast.unparse(child.test) == "__name__ == '__main__'":
                continue  # run as a script (python -m), a module is the top of the house
            elif isinstance(child, ast.Import):
                found.extend((m, top) for alias in child.names if (m := _resolve(alias.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # `from pkg import module` imports the module
                    if m := _resolve(f"{base}.{alias.name}") or _resolve(base):
                        found.append((m, top))
            else:
                visit(child, top)

    visit(tree, True)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_project():
    expected = {
        "reft_edge.cli",
        "reft_edge.cli.train",
        "reft_edge.runtime.patch",
        "reft_edge.train.recipe",
        "reft_edge.export.build",
    }
    assert expected <= set(MODULES) and {"reft_edge.cli.common", "reft_edge.cli.__main__"} <= COMMANDS
    assert ("reft_edge.runtime.positions", True) in IMPORTS["reft_edge.runtime.contract"]


def test_runtime_imports_neither_training_nor_export():
    wrong = sorted(
        {
            f"{name} imports {module}{'' if top else ' (inside a function)'}"
            for name, imports in IMPORTS.items()
            if _inside(name, "reft_edge.runtime")
            for module, top in imports
            if _inside(module, "reft_edge.train") or _inside(module, "reft_edge.export")
        }
    )
    assert not wrong, "the torch-free runtime must not reach into training or export:\n" + "\n".join(wrong)


def test_core_imports_no_stage():
    wrong = sorted(
        {
            f"{name} imports {module}"
            for name, imports in IMPORTS.items()
            if not any(_inside(name, stage) for stage in STAGES) and name not in COMMANDS
            for module, _ in imports
            if any(_inside(module, stage) for stage in STAGES)
        }
    )
    assert not wrong, "the shared core (reft_edge/) is below every stage:\n" + "\n".join(wrong)


def test_stages_do_not_import_the_commands():
    wrong = sorted(
        {
            f"{name} imports {module}"
            for name, imports in IMPORTS.items()
            if any(_inside(name, stage) for stage in STAGES)
            for module, _ in imports
            if module in COMMANDS
        }
    )
    assert not wrong, "the commands sit above every stage:\n" + "\n".join(wrong)


def test_no_import_cycle_at_module_level():
    graph = {name: sorted({m for m, top in imports if top and m != name}) for name, imports in IMPORTS.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in graph.get(name, ()):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [name, nxt] if nxt in path else [name, nxt])
            elif nxt not in state:
                walk(nxt, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    assert not cycles, "import cycles at module level:\n" + "\n".join(" -> ".join(c) for c in cycles)
