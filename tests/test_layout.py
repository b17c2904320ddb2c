"""Import rules of the package layout.

capsctl/ is framework-free: no module in it imports torch, tensorflow, keras, onnx, onnxruntime,
onnxscript or jax, nor a backend package (capsctl_torch, capsctl_keras), in any import statement (at the
top or inside a function) or importlib.import_module / __import__ call with a literal name. The backends
are reached only through capsctl.backend.get_backend, whose registry names them in strings. Each backend
package imports no other backend's framework. And `import capsctl.cli` (so `capsctl --help`) loads none
of them in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from ._helpers import dotted_name

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"torch", "tensorflow", "keras", "onnx", "onnxruntime", "onnxscript", "jax"}
BACKEND_PACKAGES = {"capsctl_torch", "capsctl_keras"}
DYNAMIC_IMPORTS = {"importlib.import_module", "import_module", "__import__"}


def imported_modules(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`, wherever it sits; relative imports
    (within the package) are left out."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and dotted_name(node.func) in DYNAMIC_IMPORTS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _offences(folder: Path, forbidden: set[str]) -> tuple[list[str], int]:
    offences, seen = [], 0
    for path in sorted(folder.rglob("*.py")):
        for line, module in imported_modules(path.read_text(), str(path)):
            seen += 1
            if module.split(".")[0] in forbidden:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return offences, seen


def test_the_checker_sees_every_kind_of_import():
    source = (
        "import os, torch.nn as nn\n"
        "from keras import ops\n"
        "from . import sibling\n"
        "def later():\n"
        "    import tensorflow as tf\n"
        "    from onnxscript import opset18\n"
        "    importlib.import_module('jax.numpy')\n"
        "    import_module('onnxruntime')\n"
        "    __import__('capsctl_torch')\n"
        "    importlib.import_module(name)  # not a literal: a registry lookup, allowed\n"
    )
    assert [m for _, m in imported_modules(source)] == [
        "os", "torch.nn", "keras", "tensorflow", "onnxscript", "jax.numpy", "onnxruntime", "capsctl_torch"]


def test_capsctl_imports_no_framework_and_no_backend():
    offences, seen = _offences(ROOT / "capsctl", FRAMEWORKS | BACKEND_PACKAGES)
    assert seen > 100  # the walk really read the package
    assert not offences, "\n".join(offences)


def test_each_backend_imports_only_its_own_framework():
    own = {"capsctl_torch": {"torch", "onnx", "onnxruntime", "onnxscript"},  # torch writes the ONNX export
           "capsctl_keras": {"keras", "tensorflow"}}
    for package, allowed in own.items():
        forbidden = (FRAMEWORKS | BACKEND_PACKAGES) - allowed - {package}
        offences, seen = _offences(ROOT / "backends" / package, forbidden)
        assert seen > 10, package
        assert not offences, "\n".join(offences)


def test_importing_the_cli_and_its_help_load_no_framework():
    code = (
        "import sys\n"
        "loaded = lambda: sorted(m for m in {names!r} if m in sys.modules)\n"
        "import capsctl.cli\n"
        "print('IMPORT', loaded())\n"
        "try:\n    capsctl.cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('HELP', loaded())\n"
    ).format(names=sorted(FRAMEWORKS | BACKEND_PACKAGES | {"numpy"}))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "IMPORT []" in res.stdout and "HELP []" in res.stdout, res.stdout
    assert "train" in res.stdout and "eval-pairs" in res.stdout  # the help really ran
