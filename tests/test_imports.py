"""The package's shape: every module imports on its own (no import circles), only ``__main__``
imports the CLI, and the quick commands never load torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys

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
