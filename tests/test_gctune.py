"""proxy.gctune: what a worker does to the garbage collector after start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxy.settings import resolve

SCRIPT = """
import gc, json, sys
from proxy import gctune
before = gc.get_threshold()
gctune.tune(int(sys.argv[1]))
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def _tuned(threshold: int) -> dict:
    """Run ``tune`` in a fresh interpreter: the test process's own collector stays as it is."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threshold)], capture_output=True, check=True, text=True)
    return json.loads(out.stdout)


def test_tune_freezes_start_up_objects_and_raises_generation_0():
    got = _tuned(50_000)
    assert got["after"] == [50_000, *got["before"][1:]]
    assert got["frozen"] > 1_000  # the interpreter's and the module's objects: never scanned again


def test_zero_keeps_pythons_defaults():
    got = _tuned(0)
    assert got["after"] == got["before"]
    assert got["frozen"] == 0


@pytest.mark.parametrize(("env", "expected"), [({}, 50_000), ({"FHIRCRYPT_GC_THRESHOLD": "0"}, 0)])
def test_threshold_is_a_setting(env, expected):
    assert resolve({}, env).values["gc_threshold"].value == expected
