"""Properties of the pure core over generated resources of every type the shipped policies cover.

For each policy (SATUSEHAT, HIPAA) and each covered type, hypothesis builds resources
that fill the covered elements with arbitrary valid-typed values (see fhir_strategies).
Properties: the write path (``encrypt_for_write``: contained resources, blind indexes,
envelope) followed by the read path (``decrypt_body``) gives back exactly what was
written; the stored form contains no covered value; a reader granted nothing sees no
covered value either; and any single-character change to a ciphertext never returns data.
"""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.auth.decision import key_holder, unscoped
from proxy.keymgmt.keyring import Keyring
from proxy.policy.compiler import compile_file
from proxy.transform.bodies import decrypt_body, encrypt_for_write
from proxy.transform.markers import CIPHERTEXT_URL
from proxy.transform.records import ReadReport
from tests.adversarial.fhir_strategies import covered_needles, covered_resource
from tests.adversarial.profiles import examples
from tests.conftest import ROOT

POLICIES = {name: compile_file(ROOT / "policies" / f"{name}.yaml") for name in ("satusehat", "hipaa")}
KEYRING = Keyring.generate()


def resources_of(policy_name: str) -> st.SearchStrategy:
    covered = POLICIES[policy_name].resources
    return st.sampled_from(sorted(covered)).flatmap(lambda t: covered_resource(covered[t], covered))


def _drawn(data, policy_name: str) -> tuple[dict, set[str], dict]:
    """A generated resource, the needles of its covered values, and its stored (encrypted) form."""
    policy = POLICIES[policy_name]
    resource = data.draw(resources_of(policy_name))
    needles = covered_needles(resource, policy.resources[resource["resourceType"]], policy.resources)
    return resource, needles, _sealed(resource, policy)


def _sealed(resource: dict, policy) -> dict:
    stored = copy.deepcopy(resource)
    encrypt_for_write(stored, policy, KEYRING, validate="off")
    return stored


def over_policies(n: int):
    """A property run ``n`` times per profile unit for each shipped policy, drawing from ``data``."""

    def wrap(test):
        return pytest.mark.parametrize("policy_name", sorted(POLICIES))(examples(n)(given(data=st.data())(test)))

    return wrap


@over_policies(120)
def test_every_covered_type_round_trips_exactly_and_stores_no_covered_value(policy_name, data):
    policy = POLICIES[policy_name]
    resource, needles, stored = _drawn(data, policy_name)
    at_rest = orjson.dumps(stored).decode()
    assert not [n for n in needles if n in at_rest], "covered value at rest"

    report = ReadReport()
    decrypt_body(stored, policy, KEYRING, key_holder(), report)
    assert not report.failures
    assert stored == resource
    # byte for byte (NFC stays NFC, NFD stays NFD); JSON key order carries no meaning
    assert orjson.dumps(stored, option=orjson.OPT_SORT_KEYS) == orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


@over_policies(60)
def test_a_reader_granted_nothing_sees_no_covered_value(policy_name, data):
    policy = POLICIES[policy_name]
    _, needles, stored = _drawn(data, policy_name)
    report = ReadReport()
    decrypt_body(stored, policy, KEYRING, unscoped(None), report)
    seen = orjson.dumps(stored).decode()
    assert not [n for n in needles if n in seen]
    assert CIPHERTEXT_URL not in seen and not report.failures


@examples(100)
@given(data=st.data())
def test_a_changed_ciphertext_never_decrypts(data):
    policy = POLICIES["satusehat"]
    resource = data.draw(resources_of("satusehat"))
    stored = _sealed(resource, policy)
    text = orjson.dumps(stored).decode()
    marker = f'"url":"{CIPHERTEXT_URL}","valueString":"v1.'
    starts = [i + len(marker) for i in range(len(text)) if text.startswith(marker, i)]
    if not starts:
        return  # nothing covered was present (e.g. only an empty choice): nothing to tamper with
    # positions are drawn as plain numbers: the ciphertext is random, the draws must not depend on it
    start = starts[data.draw(st.integers(0, 10**6)) % len(starts)]
    end = text.index('"', start)
    pos = start + data.draw(st.integers(0, 10**6)) % (end - start)
    replacement = "A" if text[pos] != "A" else "B"
    tampered = orjson.loads(text[:pos] + replacement + text[pos + 1 :])
    report = ReadReport()
    decrypt_body(tampered, policy, KEYRING, key_holder(), report)
    assert report.failures, "a changed ciphertext was accepted"
    seen = orjson.dumps(tampered).decode()
    assert CIPHERTEXT_URL not in seen
    # the record MAC covers every ciphertext of a record: the record that held it is masked as a whole
    # (the others, with envelopes of their own, still decrypt)
    changed = text[start:end]
    held = next((c for c in stored.get("contained", []) if changed in orjson.dumps(c).decode()), None)
    record = resource["contained"][stored["contained"].index(held)] if held is not None else resource
    plain = {k: v for k, v in record.items() if k != "contained"}
    needles = covered_needles(plain, policy.resources[record["resourceType"]], {})
    assert not [n for n in needles if n in seen], "a value of the record whose ciphertext changed was returned"
