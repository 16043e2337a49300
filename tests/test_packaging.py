"""The installed package stands alone: it imports nothing from the source checkout's dev trees, and the wheel
holds the package, its data, py.typed and the licence — not the tests, the demo or the benchmark."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

DEV_TREES = frozenset({"tests", "demo", "bench", "scripts"})  # in the checkout, not in the wheel


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_module_of_the_package_imports_a_dev_tree_or_edits_sys_path():
    offenders = []
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        source = path.read_text()
        wrong = _imported_roots(ast.parse(source)) & DEV_TREES
        if wrong or "sys.path" in source:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(wrong) or 'sys.path'}")
    assert not offenders


def test_every_module_imports_without_the_checkout_on_the_path(tmp_path):
    """Outside the checkout (as after `pip install`), each module imports, and no dev tree gets loaded."""
    script = (
        "import importlib, importlib.util, pkgutil, sys, proxy\n"
        f"assert all(importlib.util.find_spec(t) is None for t in {sorted(DEV_TREES)!r}), 'dev trees importable'\n"
        "for m in pkgutil.walk_packages(proxy.__path__, 'proxy.'):\n"
        "    if not m.name.endswith('.__main__'):  # that one runs the CLI\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {sorted(DEV_TREES)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_holds_the_package_py_typed_and_the_licence_only(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            tmp_path,
            ROOT,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("fhircrypt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith("proxy/") and not re.match(r"fhircrypt-[^/]+\.dist-info/", n)]
    assert not outside
    assert "proxy/py.typed" in names and "proxy/policy/r4_elements.json" in names
    licence = next(n for n in names if n.endswith("/LICENSE"))
    assert "Apache License" in zipfile.ZipFile(wheel).read(licence).decode()
