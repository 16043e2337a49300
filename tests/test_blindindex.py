"""Properties of normalisation and blind indexing: what a search computes is what a write stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b32_128
from proxy.keymgmt.keyring import Keyring
from proxy.outcome import FhirError
from proxy.policy.indexing import IndexSpec
from proxy.transform import guard
from proxy.transform.indexes import value_tokens
from proxy.transform.markers import INDEX_BASES, index_system
from proxy.transform.namechain import chains
from proxy.transform.normalize import digits, fold
from proxy.transform.search import Searcher, query_tokens
from tests.test_search import BPJS, satusehat_server_systems

NAME = IndexSpec(param="family", param_type="string", label="Patient/name/family", value_type="string", prefix_min=3)
NIK = IndexSpec(
    param="identifier",
    param_type="token",
    label="Patient/nik/identifier",
    value_type="string",
    token_system="https://fhir.kemkes.go.id/id/nik",
    normalize="digits",
)
CODE = IndexSpec(param="code", param_type="token", label="Condition/code/code", value_type="CodeableConcept")
BIRTH = IndexSpec(
    param="birthdate", param_type="date", label="Patient/birthdate/birthdate", value_type="date", year=True
)

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)


@settings(max_examples=300)
@given(names)
def test_folding_is_the_same_for_nfc_and_nfd(text):
    assert fold(unicodedata.normalize("NFC", text)) == fold(unicodedata.normalize("NFD", text))


@settings(max_examples=300)
@given(names, st.data())
def test_every_long_enough_prefix_of_a_stored_name_is_found(part, data):
    stored = set(value_tokens(NAME, part))
    folded = fold(part)
    if len(folded) < NAME.prefix_min:
        return
    k = data.draw(st.integers(NAME.prefix_min, len(folded)))
    query = data.draw(st.sampled_from([folded[:k], folded[:k].upper(), unicodedata.normalize("NFD", folded[:k])]))
    if fold(query) != folded[:k]:
        return  # upper-casing changes some characters' length (e.g. 'ß' -> 'SS'); not a prefix any more
    assert set(query_tokens(NAME, query, "q", "family")) <= stored


@settings(max_examples=300)
@given(st.text("0123456789", min_size=16, max_size=16), st.sampled_from(["", " ", "-", "."]))
def test_nik_written_with_separators_is_found_by_its_digits(nik, sep):
    written = sep.join([nik[:6], nik[6:12], nik[12:]])
    stored = value_tokens(NIK, written)
    assert set(query_tokens(NIK, f"{NIK.token_system}|{nik}", "q", "identifier")) <= set(stored)
    assert set(query_tokens(NIK, nik, "q", "identifier")) <= set(stored)
    assert set(query_tokens(NIK, f"{NIK.token_system}|", "q", "identifier")) <= set(stored)
    assert query_tokens(NIK, f"https://other|{nik}", "q", "identifier") is None
    assert digits(written) == nik


@settings(max_examples=200)
@given(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.", min_size=1, max_size=8))
def test_code_token_forms_match_what_was_stored(code):
    system = "http://hl7.org/fhir/sid/icd-10"
    stored = set(value_tokens(CODE, {"coding": [{"system": system, "code": code}]}))
    for query in (f"{system}|{code}", code, f"{system}|"):
        assert set(query_tokens(CODE, query, "q", "code")) <= stored


@settings(max_examples=200)
@given(st.dates())
def test_dates_are_found_by_day_and_year(day):
    stored = set(value_tokens(BIRTH, day.isoformat()))
    assert set(query_tokens(BIRTH, day.isoformat(), "q", "birthdate")) <= stored
    assert set(query_tokens(BIRTH, f"{day.year:04d}", "q", "birthdate")) <= stored


def test_tokens_are_keyed_deterministic_and_separated_by_label():
    a, b = BlindIndexer(b"\x01" * 32), BlindIndexer(b"\x02" * 32)
    token = a.token("Patient/nik/identifier", "x|3201")
    assert token == a.token("Patient/nik/identifier", "x|3201") and len(token) == 32 and token == token.lower()
    assert token != b.token("Patient/nik/identifier", "x|3201")
    assert token != a.token("RelatedPerson/nik/identifier", "x|3201")


def test_published_blind_index_vectors():
    """tests/vectors/blind-index-v1.json: another implementation computes the same tokens."""
    import hashlib
    import hmac
    import json
    from pathlib import Path

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    doc = json.loads((Path(__file__).parent / "vectors" / "blind-index-v1.json").read_text())
    root = bytes.fromhex(doc["index_root"])
    for v in doc["vectors"]:
        key = HKDF(hashes.SHA256(), 32, None, b"fhircrypt/v1 blind-index\x1f" + v["label"].encode()).derive(root)
        assert hmac.new(key, v["text"].encode(), hashlib.sha256).hexdigest()[:32] == v["token"]
        assert BlindIndexer(root).token(v["label"], v["text"]) == v["token"]


def test_v2_tokens_are_26_lowercase_base32_characters_unrelated_to_v1():
    a = BlindIndexer(b"\x01" * 32)
    (token,) = a.tokens_v2("Patient/nik/identifier", ["x|3201"])
    assert len(token) == 26 and set(token) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert token == a.tokens_v2("Patient/nik/identifier", ["x|3201"])[0]
    assert token != a.tokens_v2("RelatedPerson/nik/identifier", ["x|3201"])[0]
    # another key (the version is in the HKDF info), not another encoding of the v1 digest
    assert base64.b32decode(token.upper() + "======").hex() != a.token("Patient/nik/identifier", "x|3201")


def test_published_blind_index_v2_vectors():
    """tests/vectors/blind-index-v2.json, recomputed with nothing but cryptography, hmac and base64."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    doc = json.loads((Path(__file__).parent / "vectors" / "blind-index-v2.json").read_text())
    root = bytes.fromhex(doc["index_root"])
    for v in doc["vectors"]:
        key = HKDF(hashes.SHA256(), 32, None, b"fhircrypt/v2 blind-index\x1f" + v["label"].encode()).derive(root)
        digest = hmac.new(key, v["text"].encode(), hashlib.sha256).digest()[:16]
        assert base64.b32encode(digest).decode().rstrip("=").lower() == v["token"]
        assert v["system"] == "https://fhircrypt.dev/fhir/i/" + v["label"].split("/", 1)[1]
        assert BlindIndexer(root).tokens_v2(v["label"], [v["text"]]) == [v["token"]]
        assert index_system(v["label"]) == v["system"]
    for c in doc["chains"]:
        key = HKDF(hashes.SHA256(), 32, None, b"fhircrypt/v2 blind-index\x1f" + c["label"].encode()).derive(root)

        def b32(text: str, key: bytes = key) -> str:
            digest = hmac.new(key, text.encode(), hashlib.sha256).digest()[:16]
            return base64.b32encode(digest).decode().rstrip("=").lower()

        f, n = c["folded"], c["prefix"]
        expected = "fhircrypt~" + b32(f[:n])[:20] + "".join(b32(f[:i])[:5] for i in range(n + 1, min(len(f), 64) + 1))
        assert c["chain"] == expected and fold(c["part"]) == f
        assert chains(BlindIndexer(root), c["label"], [f], n) == [expected]


@given(st.lists(st.binary(min_size=16, max_size=16), max_size=80))
def test_batched_base32_equals_the_standard_library(values):
    assert b32_128(values) == [base64.b32encode(v).decode().rstrip("=").lower() for v in values]


def test_system_only_identifier_searches_go_to_the_clear_system_only_where_the_policy_says_so(satusehat):
    """defaults.identifier_system_search: server drops the S|* token of an identifier spelled as listed and
    sends identifier=S| as it is, OR-ed with the S|* tokens; a paging link with that form comes back
    through the same group checks, and no token of another field rides along."""
    server = satusehat_server_systems()
    specs = {s.label: s for el in server.resources["Patient"].elements for s in el.indexes}
    nik = specs["Patient/nik/identifier"]
    assert nik.system_in_clear and not any(s.system_in_clear for s in specs.values() if s.param != "identifier")
    assert not any(s.system_in_clear for el in satusehat.resources["Patient"].elements for s in el.indexes)
    assert "identifier-system-search" in {f.code for f in server.findings} - {f.code for f in satusehat.findings}
    system = nik.token_system
    assert value_tokens(nik, "3273012903870002", system) == [f"{system}|3273012903870002"]
    for other in (system.upper(), system + "/", None):  # the same system to the proxy, not to the server
        assert f"{system}|*" in value_tokens(nik, "3273012903870002", other)
    assert f"{system}|*" in value_tokens(NIK, "3273012903870002", system)  # the default: a token for every value

    ring = Keyring.generate()
    everyone = Searcher(server.resources, ring.indexer)
    billing = Searcher(server.resources, ring.indexer, frozenset({"insurance"}))
    ((name, value),) = guard.check_search("Patient", [("identifier", f"{system.upper()}|")], everyone, "q")
    clear, *tokens = value.split(",")
    assert (name, clear) == ("identifier", f"{system}|") and len(tokens) == 2  # the v2 and the v1 S|* token
    assert all(t.startswith(INDEX_BASES) for t in tokens)
    assert guard.check_search("Patient", [(name, value)], everyone, "q") == [(name, value)]  # a paging link
    with pytest.raises(FhirError) as refused:
        guard.check_search("Patient", [(name, value)], billing, "q")
    assert refused.value.status == 403
    ((_, bpjs),) = guard.check_search("Patient", [("identifier", f"{BPJS}|")], billing, "q")
    assert bpjs.startswith(f"{BPJS}|,")
    with pytest.raises(FhirError) as refused:  # a NIK token copied into the BPJS link
        guard.check_search("Patient", [("identifier", f"{bpjs},{tokens[0]}")], billing, "q")
    assert refused.value.status == 403
    chained = guard.check_search("Condition", [("subject:Patient.identifier", f"{system}|")], everyone, "q")
    assert chained == [("subject:Patient.identifier", value)]
    default = Searcher(satusehat.resources, ring.indexer)
    ((_, value),) = guard.check_search("Patient", [("identifier", f"{system}|")], default, "q")
    assert value.split(",") == tokens  # the shipped default: the S|* tokens only, as before
