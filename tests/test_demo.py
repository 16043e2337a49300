"""The demo (`./dev demo`, a dev script in demo/): short by default, everything with --full, no placeholders."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from demo.scenario import DemoError, resolve, transaction
from tests.conftest import ROOT

PLACEHOLDER = re.compile(r"\b[A-Z]+_ID\b|REPLACE-WITH-")
TYPES = ("Practitioner", "Location", "Patient", "Encounter", "Condition", "Observation", "MedicationRequest")


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "demo", *args], capture_output=True, text=True, cwd=ROOT, timeout=180, check=False
    )


def test_every_placeholder_of_the_samples_becomes_a_resource_of_the_demo():
    bundle, sources = transaction("org-1")
    text = str(bundle)
    assert not PLACEHOLDER.search(text)
    urns = {e["fullUrl"] for e in bundle["entry"]}
    references = set(re.findall(r"'reference': '([^']+)'", text))
    assert references <= urns | {"Organization/org-1"}, references - urns
    assert "http://sys-ids.kemkes.go.id/mr/org-1" in text  # the MRN system names the hospital
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == list(TYPES)
    assert sources[:2] == ["", ""] and all(sources[2:])


def test_a_placeholder_without_a_resource_is_an_error_not_data():
    with pytest.raises(DemoError, match="LOCATION_ID"):
        resolve('{"reference": "Location/LOCATION_ID"}', "x.json", {}, "org-1")


@pytest.mark.slow
def test_the_default_demo_fits_two_screens_and_finds_no_plaintext_at_the_server():
    out = _demo()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) <= 100, len(lines)
    assert not PLACEHOLDER.search(out.stdout)
    for rtype in TYPES:
        assert any(line.strip().startswith(f"{rtype}/") for line in lines), rtype
    total = next(line.split() for line in lines if line.strip().startswith("total"))
    assert int(total[1]) > 40 and total[-1] == "0"  # encrypted elements; plaintext values found at the server
    assert re.search(r"\): 0 of \d+ plaintext PHI values found\.", out.stdout)
    assert "APPLICATION SEES (through fhircrypt)" in out.stdout and "═══" not in out.stdout


@pytest.mark.slow
def test_the_full_demo_shows_every_resource_side_by_side():
    out = _demo("--full")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert not PLACEHOLDER.search(out.stdout)
    for rtype in TYPES:
        assert f"═══ {rtype}/" in out.stdout
    assert len(out.stdout.splitlines()) > 500
