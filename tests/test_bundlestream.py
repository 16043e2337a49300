"""The incremental Bundle splitter (proxy.transform.bundlestream): the same values as a whole-body parse,
whatever the chunking, and the bounds of a whole-body parse (nesting, size, duplicates, broken JSON);
and Bulk export's line splitter, the other streamed answer."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.outcome import FhirError
from proxy.transform import jsonnum
from proxy.transform.bulk import LineSplitter
from proxy.transform.bundlestream import (
    ENTRIES,
    ENTRIES_END,
    ENTRY,
    MAX_DEPTH,
    MEMBER,
    BundleSplitter,
    SplitError,
    number,
)
from tests.test_decimals import numbers


def _split(raw: bytes, size: int, max_span: int = 1 << 30) -> list:
    splitter = BundleSplitter(max_span)
    parts = []
    for at in range(0, len(raw), size):
        parts += splitter.feed(raw[at : at + size])
    return parts + splitter.close()


def _rebuild(parts: list) -> dict:
    """The document the parts describe, as a whole-body parse would give it."""
    body: dict = {}
    for kind, value in parts:
        if kind == MEMBER:
            body[value[0]] = value[1]
        elif kind == ENTRIES:
            body["entry"] = []
        elif kind == ENTRY:
            body["entry"].append(value)
    return body


def _number_via_ijson(text: str):
    (kind, value) = _split(b'{"n":' + text.encode() + b"}", 7)[0]
    assert kind == MEMBER
    return value[1]


@given(numbers)
@example("1.50")
@example("-0.0")
@example("0.0000001")
@example("1e-7")
@example("123456789012345678901234")
@example("1.5e3")
def test_numbers_keep_their_value_and_precision_and_mostly_their_text(text):
    got = _number_via_ijson(text)
    written = jsonnum.dumps(got).decode()
    if text == "-0":  # ijson reads the integer -0 as 0: the one value whose sign is lost
        assert written == "0"
        return
    assert Decimal(written).as_tuple() == Decimal(text).as_tuple()  # sign, digits and exponent: precision kept
    whole = jsonnum.dumps(jsonnum.loads(text)).decode()
    shortest = orjson.dumps(orjson.loads(text)).decode()
    if text == shortest or ("e" not in text.lower() and "e" not in shortest):
        assert written == whole  # the float's own shortest text, or plain notation: written exactly as read


def test_numbers_beyond_a_double_are_refused_as_orjson_refuses_them():
    for text in ("1e400", "1" * 400):
        with pytest.raises(orjson.JSONDecodeError):
            jsonnum.loads(text)
        with pytest.raises(SplitError):
            _number_via_ijson(text)
    assert number(1 << 70) == float(1 << 70) and jsonnum.dumps(number(1 << 70)) == str(1 << 70).encode()


BUNDLE = {
    "resourceType": "Bundle",
    "id": "b1",
    "meta": {"lastUpdated": "2026-01-01T00:00:00Z"},
    "type": "searchset",
    "total": 3,
    "link": [{"relation": "self", "url": "http://x/fhir/R4/Patient"}],
    "entry": [
        {
            "fullUrl": "u1",
            "resource": {"resourceType": "Patient", "id": "1", "name": [{"family": "Ä\u00e9\U0001f600"}]},
        },
        {"resource": {"resourceType": "Observation", "id": "2", "valueQuantity": {"value": 1.50}}, "search": {}},
        "not an object",
        {"resource": {"resourceType": "Observation", "id": "3", "component": [[[[]]]], "x": [None, True, False]}},
    ],
    "signature": {"data": "after the entries"},
}


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
def test_parts_rebuild_the_whole_body_parse_whatever_the_chunking(size):
    raw = orjson.dumps(BUNDLE).replace(b'"value":1.5', b'"value":1.50')
    parts = _split(raw, size)
    kinds = [k for k, _ in parts]
    assert kinds == [MEMBER] * 6 + [ENTRIES] + [ENTRY] * 4 + [ENTRIES_END, MEMBER]
    assert jsonnum.dumps(_rebuild(parts)) == jsonnum.dumps(jsonnum.loads(raw)) == raw


def test_pretty_printed_json_gives_the_same_parts():
    raw = orjson.dumps(BUNDLE, option=orjson.OPT_INDENT_2)
    assert jsonnum.dumps(_rebuild(_split(raw, 13))) == orjson.dumps(BUNDLE)


def test_entries_come_out_as_soon_as_they_are_complete():
    raw = orjson.dumps(BUNDLE)
    splitter = BundleSplitter(1 << 20)
    cut = raw.index(b'"not an object"')
    first = splitter.feed(raw[:cut])
    assert [k for k, _ in first].count(ENTRY) == 2  # the third entry has not ended yet
    rest = splitter.feed(raw[cut:]) + splitter.close()
    assert [k for k, _ in rest].count(ENTRY) == 2


@pytest.mark.parametrize(
    "raw",
    [
        b'{"resourceType":"Bundle","entry":[{"a":1}',  # broken off
        b'{"resourceType":"Bundle","entry":[{"a":1}]}{}',  # trailing data
        b'{"resourceType":"Bundle","entry":[{"a":01}]}',
        b'{"resourceType":"Bundle","entry":[{"a":NaN}]}',
        b'{"resourceType":"Bundle","entry":[{"a":"\xff"}]}',
        b'["resourceType"]',
        b'"Bundle"',
        b'{"resourceType":"Bundle","type":"searchset","type":"x"}',  # what would a client see?
        b'{"entry":[],"entry":[{"resourceType":"Patient"}]}',
    ],
)
def test_what_a_whole_body_parse_refuses_or_cannot_mean_once_is_refused(raw):
    with pytest.raises(SplitError) as caught:
        _split(raw, 4)
    assert "resourceType" not in str(caught.value) and "Patient" not in str(caught.value)  # no content quoted


def test_nesting_is_bounded_inside_entries_and_members():
    inside = b"[" * (MAX_DEPTH - 3) + b"]" * (MAX_DEPTH - 3)
    _split(b'{"entry":[{"a":' + inside + b"}]}", 100)  # 1 + 1 + 1 + (MAX_DEPTH - 3) levels: the limit
    for raw in (b'{"entry":[{"a":[' + inside + b"]}]}", b'{"meta":{"a":[[' + inside + b"]]}}"):
        with pytest.raises(SplitError, match="nested more than"):
            _split(raw, 100)


def test_a_bomb_is_refused_in_its_first_chunk_not_built():
    splitter = BundleSplitter(1 << 30)
    splitter.feed(b'{"entry":[')
    with pytest.raises(SplitError, match="nested more than"):
        splitter.feed(b"[" * (1 << 16))  # the proxy feeds 64 KiB chunks: one chunk's events at most


def test_one_entry_may_span_at_most_max_span_bytes_but_the_page_may_be_any_size():
    entry = orjson.dumps({"resource": {"resourceType": "Basic", "id": "x" * 900}})
    page = b'{"resourceType":"Bundle","entry":[' + b",".join([entry] * 200) + b"]}"
    assert sum(k == ENTRY for k, _ in _split(page, 256, max_span=2048)) == 200
    big = b'{"resourceType":"Bundle","entry":[' + entry.replace(b"x" * 900, b"x" * 5000) + b"]}"
    with pytest.raises(SplitError, match="larger than 2048 bytes"):
        _split(big, 256, max_span=2048)
    with pytest.raises(SplitError, match="larger than 2048 bytes"):  # members before the entries count together
        _split(b'{"a":"' + b"y" * 1500 + b'","b":"' + b"y" * 1500 + b'","entry":[]}', 256, max_span=2048)


@given(st.lists(st.sampled_from([b"a", b"bc", b"\n", b" ", b"\n\n", b"{}"]), max_size=40), st.integers(1, 7))
def test_export_lines_are_cut_alike_whatever_the_chunking(pieces, size):
    """Bulk NDJSON's line splitter (the other streamed answer): the lines of the whole, for any chunking."""
    data = b"".join(pieces)
    splitter = LineSplitter(1 << 20)
    lines = []
    for at in range(0, len(data), size):
        lines += splitter.feed(data[at : at + size])
    assert lines + splitter.close() == [line for line in data.split(b"\n") if line.strip()]


def test_an_export_line_over_the_limit_is_refused_while_it_arrives():
    splitter = LineSplitter(100)
    assert splitter.feed(b"x" * 60 + b"\n" + b"y" * 60) == [b"x" * 60]
    with pytest.raises(FhirError, match="exceeds"):
        splitter.feed(b"y" * 50)
