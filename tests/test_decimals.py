"""FHIR decimals keep their exact text through the proxy (docs/interactions.md, "Numbers").

``1.50`` is not ``1.5`` in FHIR. The properties prove the fast-path detector of
``proxy.transform.jsonnum`` never lets orjson rewrite a number, and that loads/dumps
write back every number's text; the proxy tests write and read Observations through
the real proxy and the real test upstream under the shipped policies (create, read,
search, transaction Bundle, PATCH, Bulk export, ``fhircrypt reencrypt``).
"""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.auth.decision import key_holder
from proxy.keymgmt.keyring import Keyring
from proxy.migrate.assess import Plan, envelope_key_ids
from proxy.migrate.commands import Connection, reencrypt
from proxy.migrate.run import Options
from proxy.policy.compiler import compile_file
from proxy.transform import jsonnum
from proxy.transform.bodies import decrypt_body, serialise_for_client
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource, encrypt_resource
from tests.conftest import FHIR_JSON, ROOT, assert_no_plaintext
from tests.test_bulk import _local, _manifest

# ---------------------------------------------------------------- JSON number texts (RFC 8259 grammar)

_digits = st.text("0123456789", min_size=1, max_size=22)
_int_part = st.one_of(
    st.just("0"), st.builds(lambda a, b: a + b, st.sampled_from("123456789"), st.text("0123456789", max_size=22))
)
_frac = st.one_of(st.just(""), _digits.map(lambda d: "." + d))
_exp = st.one_of(
    st.just(""),
    st.builds(lambda e, s, d: e + s + d[:3], st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), _digits),
)
numbers = st.builds(lambda sign, i, f, e: sign + i + f + e, st.sampled_from(["", "-"]), _int_part, _frac, _exp).filter(
    lambda t: _finite(t)
)
_ws = st.text(" \t\n\r", max_size=2)


def _finite(text: str) -> bool:
    try:
        orjson.loads(text)  # orjson refuses numbers beyond a double's range (1e400): no round trip to keep
    except orjson.JSONDecodeError:
        return False
    return True


# strings made of what numbers and JSON punctuation are made of: the detector must not be fooled by them
_lookalikes = st.text(':,[]{}0123456789.eE-+ "\\\n', max_size=12).map(lambda t: orjson.dumps(t).decode())


_PLAIN = st.just('"x"')


@st.composite
def documents(draw, strings: st.SearchStrategy[str] = _PLAIN) -> tuple[str, list[str]]:
    """A JSON document holding number texts in objects and arrays, compact or with whitespace."""
    texts = draw(st.lists(numbers, min_size=1, max_size=4))
    ws = draw(_ws)
    items = []
    for i, t in enumerate(texts):
        shape = draw(st.sampled_from(["member", "array", "nested"]))
        if shape == "member":
            items.append(f'"k{i}"{ws}:{ws}{t}')
        elif shape == "array":
            items.append(f'"k{i}":[{ws}{draw(strings)},{ws}{t}{ws}]')
        else:
            items.append(f'"k{i}":{{"v":[{t},{ws}null]}}')
    return "{" + f",{ws}".join(items) + ws + "}", texts


@given(numbers, st.sampled_from(['{{"v":{}}}', "[{}]", '{{ "v" :\n {} }}', "[1,{}]", "{}", '[ {} ,"a"]']))
def test_when_the_detector_says_fast_orjson_writes_the_number_back_byte_for_byte(text, context):
    raw = context.format(text).encode()
    if jsonnum.exact(raw, orjson.loads(raw)):
        assert orjson.dumps(orjson.loads(text)) == text.encode()


@given(documents(_lookalikes))
def test_when_the_detector_says_fast_every_number_of_a_document_survives_orjson(doc):
    raw, texts = doc
    if jsonnum.exact(raw.encode(), orjson.loads(raw)):
        assert [orjson.dumps(orjson.loads(t)) for t in texts] == [t.encode() for t in texts]


@given(documents())
@example(('{"k0":-0,"k1":1000000000000000001}', ["-0", "1000000000000000001"]))  # a slow-path int64 stays an int
def test_loads_then_dumps_keeps_every_number_text(doc):
    raw, texts = doc
    value = jsonnum.loads(raw.encode())
    out = jsonnum.dumps(value)
    assert re.findall(rb"(?<=[:\[,])-?[0-9][0-9.eE+-]*", out) == [t.encode() for t in texts]
    assert value == orjson.loads(raw)  # the same values as orjson, where orjson's are numbers too
    assert jsonnum.loads(out) == value and jsonnum.dumps(jsonnum.loads(out)) == out


@pytest.mark.parametrize(
    ("text", "fast"),
    [
        ("1.5", True),
        ("1.0", True),
        ("100", True),
        ("1000000000000000001", True),
        ("1.50", False),
        ("2.00", False),
        ("1e2", False),
        ("1E+2", False),
        ("0.1000000000000000055511151231257827", False),
        ("-0", False),
        ("18446744073709551616", False),
        ("-9223372036854775809", False),
        ("123456789012345678901234567890", False),
    ],
)
def test_numbers_orjson_would_rewrite_take_the_slow_path_and_keep_their_text(text, fast):
    raw = f'{{"valueQuantity": {{"value": {text}}}}}'.encode()
    assert jsonnum.exact(raw, orjson.loads(raw)) is fast
    value = jsonnum.loads(raw)
    assert jsonnum.dumps(value) == f'{{"valueQuantity":{{"value":{text}}}}}'.encode()
    assert value["valueQuantity"]["value"] == orjson.loads(text)


def test_the_slow_path_refuses_what_orjson_refuses():
    for bad in (b'{"v":1.50,"w":NaN}', b'{"v":1.50,"w":"\xff"}', b'\xef\xbb\xbf{"v":1.50}', b'{"v":1.50,}'):
        with pytest.raises(orjson.JSONDecodeError):
            jsonnum.loads(bad)


def test_a_number_keeps_its_text_inside_the_ciphertext_and_an_old_ciphertext_still_decrypts():
    policy = compile_file(ROOT / "policies" / "satusehat.yaml")
    rp, ring = policy.resources["Observation"], Keyring.generate()
    raw = b'{"resourceType":"Observation","status":"final","valueQuantity":{"value":1.50,"unit":"g/dL"}}'
    for parse, expected in ((jsonnum.loads, b'"value":1.50'), (orjson.loads, b'"value":1.5')):  # orjson: as before
        resource = parse(raw)
        encrypt_resource(resource, rp, ring)
        stored = jsonnum.dumps(resource)
        assert b'"value":1.5' not in stored  # ciphertexts hold dots, so the bare digits may occur
        back, report = jsonnum.loads(stored), ReadReport()
        decrypt_resource(back, rp, ring, ALL_GROUPS, policy.unenveloped, report)
        assert not report.failures and expected in jsonnum.dumps(back)


def test_a_clear_decimal_from_the_upstream_reaches_the_client_as_stored():
    """A server that keeps decimal text (HAPI does) answers 2.00; the proxy must not make it 2.0."""
    policy = compile_file(ROOT / "policies" / "satusehat.yaml")
    raw = (
        b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Observation",'
        b'"status":"final","referenceRange":[{"low":{"value":2.00},"high":{"value":1e1}}]}}]}'
    )
    payload, report = jsonnum.loads(raw), ReadReport()
    decrypt_body(payload, policy, Keyring.generate(), key_holder(), report)
    out = serialise_for_client(payload, report, "search")
    assert b'"low":{"value":2.00}' in out and b'"high":{"value":1e1}' in out


# ---------------------------------------------------------------- through the proxy and the real upstream

OBSERVATION = """{
  "resourceType": "Observation",
  "status": "final",
  "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
  "subject": {"reference": "Patient/p-decimals"},
  "valueQuantity": {"value": 7.251900, "unit": "g/dL"},
  "component": [{"code": {"text": "big"}, "valueQuantity": {"value": 123456789012345678901234567890}}],
  "referenceRange": [{"low": {"value": 2.00, "unit": "g/dL"}}]
}"""
COVERED = [b'"value":7.251900', b'"value":123456789012345678901234567890']
NEEDLES = ["7.2519", "12345678901234567"]  # the covered values in any form the upstream could store them


def _upstream_bodies(upstream) -> list[str]:
    return [r["body"] for r in upstream.requests() if r["method"] in ("POST", "PUT")]


@pytest.mark.parametrize("policy_name", ["satusehat", "hipaa"])
async def test_covered_decimals_come_back_byte_for_byte_and_clear_ones_are_forwarded_as_written(
    proxy_for, clean_upstream, policy_name
):
    policy = compile_file(ROOT / "policies" / f"{policy_name}.yaml")
    client = await proxy_for(clean_upstream.base_url, policy)
    resp = await client.post("/fhir/R4/Observation", data=OBSERVATION.encode(), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    created = await resp.read()
    oid = orjson.loads(created)["id"]
    read = await (await client.get(f"/fhir/R4/Observation/{oid}")).read()
    found = await (await client.get("/fhir/R4/Observation?code=http://loinc.org|718-7")).read()
    for body in (created, read, found):
        for text in COVERED:
            assert text in body, body
    assert b"1.2345678901234568e+29" not in read
    # the clear decimal left the proxy as written; what the test upstream (a JavaScript server) keeps of
    # it is its own business, and the proxy hands back exactly that
    sent = _upstream_bodies(clean_upstream)
    assert any('"low":{"value":2.00' in b for b in sent), sent
    async with aiohttp.ClientSession() as http, http.get(f"{clean_upstream.base_url}/Observation/{oid}") as resp:
        stored = await resp.read()
    low = re.compile(rb'"low":\{"value":[^,}]*')
    assert low.search(read).group() == low.search(stored).group()
    assert_no_plaintext(clean_upstream.dump(), NEEDLES)
    assert_no_plaintext(({"request": r} for r in clean_upstream.requests()), NEEDLES)


async def test_transaction_bundles_and_patches_keep_decimal_text(proxy_for, clean_upstream):
    policy = compile_file(ROOT / "policies" / "satusehat.yaml")
    client = await proxy_for(clean_upstream.base_url, policy)
    bundle = (
        '{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":"urn:uuid:0d4c8a52-0b1e-4b6f-9e3c-1f2a3b4c5d6e",'
        f'"resource":{OBSERVATION},"request":{{"method":"POST","url":"Observation"}}}}]}}'
    )
    resp = await client.post("/fhir/R4", data=bundle.encode(), headers=FHIR_JSON)
    assert resp.status == 200, await resp.text()
    location = orjson.loads(await resp.read())["entry"][0]["response"]["location"]
    oid = location.split("/")[1]
    read = await (await client.get(f"/fhir/R4/Observation/{oid}")).read()
    assert all(text in read for text in COVERED), read
    patch = b'[{"op":"replace","path":"/valueQuantity/value","value":4.201900}]'
    resp = await client.patch(
        f"/fhir/R4/Observation/{oid}", data=patch, headers={"Content-Type": "application/json-patch+json"}
    )
    assert resp.status == 200, await resp.text()
    read = await (await client.get(f"/fhir/R4/Observation/{oid}")).read()
    assert b'"valueQuantity":{"value":4.201900' in read and COVERED[1] in read
    assert_no_plaintext(clean_upstream.dump(), [*NEEDLES, "4.2019"])


async def test_reencrypt_to_a_new_key_keeps_decimal_text(proxy_for, clean_upstream):
    policy, ring = compile_file(ROOT / "policies" / "satusehat.yaml"), Keyring.generate()
    client = await proxy_for(clean_upstream.base_url, policy, ring)
    resp = await client.post("/fhir/R4/Observation", data=OBSERVATION.encode(), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    oid = orjson.loads(await resp.read())["id"]
    old, new = ring.primary_id, ring.rotate()
    plan, options = Plan(policy, ring, frozenset({old})), Options(types=("Observation",), workers=2)
    assert await reencrypt(Connection(clean_upstream.base_url), plan, options, None, None) == 0
    stored = [r for r in clean_upstream.dump() if r["id"] == oid]
    assert envelope_key_ids(stored[-1]) == {new} and len(stored) == 2
    read = await (await client.get(f"/fhir/R4/Observation/{oid}")).read()
    assert all(text in read for text in COVERED), read
    assert_no_plaintext(stored, NEEDLES)


async def test_bulk_export_lines_keep_decimal_text(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, compile_file(ROOT / "policies" / "satusehat.yaml"))
    resp = await client.post("/fhir/R4/Observation", data=OBSERVATION.encode(), headers=FHIR_JSON)
    assert resp.status == 201, await resp.text()
    manifest = await _manifest(client, "/fhir/R4/$export?_type=Observation")
    (item,) = manifest["output"]
    line = await (await client.get(_local(item["url"]))).read()
    assert all(text in line for text in COVERED), line
