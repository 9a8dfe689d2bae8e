"""The package's shape: every module imports on its own, no module imports one that imports it back
(not even inside a function or for type checking), the packages sit in layers that only import
downward, only ``__main__`` imports the CLI, and the quick commands never load torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict

import pytest

from _helpers import ROOT

MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "sinkchat").rglob("*.py") if p.name != "__main__.py"
)


def test_every_module_imports_alone():
    """A circle shows only when its module is imported first, so each one is, with sinkchat forgotten
    in between (torch and the other libraries stay loaded: one interpreter, a few seconds)."""
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'sinkchat' or m.startswith('sinkchat.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as exc:\n        print('FAILED', name, repr(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "FAILED" not in out.stdout, out.stdout + out.stderr[-500:]


# Lowest first: a module may import from its own layer or the ones below, never above.
LAYERS = [
    {"__init__", "errors", "text", "files", "config", "ledger", "settings", "template", "sampling",
     "decoder"},  # plain data (decoder: the thread that owns every model call)
    {"kv"},  # the cache: a stream of tokens, no chats, no models' code
    {"model"},  # which model and how it runs (its forward writes into the cache's layers)
    {"steering", "engine", "commands"},  # a chat: turns in, events out
    {"store"},  # chats on disk; never runs the model
    {"export", "tui", "plain"},  # what users see
    {"bench"},  # measurements (bench endless drives the real TUI)
    {"cli", "__main__"},
]


def import_graph() -> dict[str, set[str]]:
    """Every ``sinkchat`` module -> the ``sinkchat`` modules it imports anywhere in its source."""
    paths = {name: ROOT / (name.replace(".", "/") + ".py") for name in MODULES}
    paths.update({name: ROOT / name.replace(".", "/") / "__init__.py" for name in MODULES
                  if not paths[name].is_file()})
    graph = defaultdict(set)
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").startswith("sinkchat"):
                target = node.module
            else:
                continue
            for alias in node.names:
                found = f"{target}.{alias.name}" if f"{target}.{alias.name}" in paths else target
                if found in paths and found != name:
                    graph[name].add(found)
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [[start]], set()
        while stack:
            path = stack.pop()
            for nxt in graph[path[-1]]:
                if nxt == goal:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(path + [nxt])
        return None

    for module in MODULES:
        for imported in graph[module]:
            back = reaches(imported, module)
            assert back is None, f"{module} imports {imported}, which imports it back: {' -> '.join(back)}"


def test_packages_import_only_downward():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    unit = lambda module: module.split(".")[1] if "." in module else "__init__"
    assert {unit(m) for m in MODULES} <= set(layer), "a new package or module: give it a layer in LAYERS"
    for module, imports in import_graph().items():
        for imported in imports:
            assert layer[unit(imported)] <= layer[unit(module)], f"{module} (layer {layer[unit(module)]}) " \
                f"imports {imported} (layer {layer[unit(imported)]})"


def test_only_main_imports_the_cli():
    for path in (ROOT / "sinkchat").rglob("*.py"):
        if path.name == "__main__.py" or "cli" in path.relative_to(ROOT / "sinkchat").parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == "cli" or n.endswith(".cli") or n.startswith("cli.") for n in names), path


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["chats", "list"], ["chats", "--help"],
                                  ["bench", "--help"], ["bench", "ppl", "--help"],
                                  ["bench", "attention", "--help"]])
def test_quick_commands_do_not_import_torch(args):
    code = ("import sys, runpy; sys.argv = ['sinkchat', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('sinkchat', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in out.stderr, out.stderr[-800:]
