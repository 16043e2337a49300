"""proxy.crypto holds pure primitives: its modules import nothing that can do I/O.

An allow-list, not a deny-list: a new import (a file, socket, SDK or environment reader, or
key management) fails here until someone decides it belongs in the primitives. Key
management with I/O is :mod:`proxy.keymgmt`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import proxy.crypto

PACKAGE = Path(proxy.crypto.__file__).parent
# What pure primitives may use: hashing, MACs, randomness, encodings, typing, the cryptography
# library's primitives, orjson (canonical bytes), the clock (URL expiry) and each other.
ALLOWED = {
    "__future__", "base64", "binascii", "collections", "hashlib", "hmac", "secrets", "time", "typing",
    "cryptography", "orjson", "proxy.crypto",
}  # fmt: skip
MODULES = sorted(PACKAGE.rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module an ``import`` or ``from … import`` in ``path`` names, wherever it sits (also in functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside proxy.crypto by construction of the package
                names.add("proxy.crypto")
            else:
                names.add(node.module or "")
    return names


def allowed(name: str) -> bool:
    return any(name == ok or name.startswith(ok + ".") for ok in ALLOWED)


def test_the_package_has_modules_to_check() -> None:
    assert {p.stem for p in MODULES} >= {"envelope", "blindindex", "encoding", "urlsign"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_primitives_import_nothing_that_does_io(path: Path) -> None:
    assert sorted(n for n in imports_of(path) if not allowed(n)) == []


def test_the_check_catches_io_and_key_management(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom pathlib import Path\n\n\ndef f():\n    from proxy.keymgmt import keyring\n")
    assert sorted(n for n in imports_of(sample) if not allowed(n)) == ["os", "pathlib", "proxy.keymgmt"]
