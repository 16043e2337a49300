"""The outline of an untouched answer judges it exactly as a full parse would, or declines.

``proxy.transform.outline`` is a faster way to the same judgement: for any JSON body, the access
screen of a caller judged by type, the audited references and the navigation links are the same on
the outline as on a full parse, and a body the outline cannot represent (or that is not valid JSON)
yields None so the caller parses it whole.
"""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.auth.caller import Caller
from proxy.auth.decision import decide
from proxy.auth.scopes import parse_scopes
from proxy.outcome import FhirError
from proxy.policy.access import CallerGrants
from proxy.transform.interactions import Interaction
from proxy.transform.outline import outline, outlines
from proxy.web.auditing import references_in
from proxy.web.upstream import has_foreign_links

pytestmark = pytest.mark.unit

UPSTREAM = "http://upstream/fhir"
TYPES = ("Patient", "Encounter", "Location", "Bundle", "Parameters", "OperationOutcome", "Observation")
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4), st.sampled_from((*TYPES, "Patient/1"))
)
_keys = st.sampled_from(
    [
        "resourceType",
        "id",
        "type",
        "link",
        "contained",
        "entry",
        "parameter",
        "part",
        "resource",
        "response",
        "location",
        "outcome",
        "url",
        "relation",
        "total",
        "name",
        "subject",
        "fullUrl",
    ]
)


def _values(children):
    return st.one_of(st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=5))


_json = st.recursive(_scalars, _values, max_leaves=30)
_link = st.fixed_dictionaries(
    {
        "relation": st.sampled_from(("self", "next", "previous")),
        "url": st.sampled_from((UPSTREAM + "/x", "http://evil/x")),
    }
)
_resource = st.recursive(
    st.fixed_dictionaries(
        {"resourceType": st.sampled_from(TYPES), "id": st.one_of(st.text("ab1-", min_size=1, max_size=3), _scalars)},
        optional={"name": _json, "subject": _json, "link": st.lists(_link, max_size=2)},
    ),
    lambda inner: st.fixed_dictionaries(
        {"resourceType": st.sampled_from(("Bundle", "Parameters", "Encounter")), "id": st.just("b1")},
        optional={
            "type": st.sampled_from(("searchset", "history", "batch-response", "collection")),
            "total": st.integers(0, 3),
            "link": st.lists(_link, max_size=2),
            "contained": st.lists(inner, max_size=2),
            "entry": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "resource": inner,
                        "fullUrl": st.text(max_size=3),
                        "response": st.fixed_dictionaries(
                            {}, optional={"location": st.sampled_from(("Patient/9/_history/1", "x")), "outcome": inner}
                        ),
                    },
                ),
                max_size=3,
            ),
            "parameter": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "resource": inner,
                        "part": st.lists(st.fixed_dictionaries({}, optional={"resource": inner}), max_size=2),
                    },
                ),
                max_size=2,
            ),
        },
    ),
    max_leaves=8,
)


def _decision(scope: str):
    caller = Caller(subject="s", scopes=parse_scopes(scope))
    return decide(CallerGrants(caller, frozenset(), (), False, True), Interaction("search", "type", "Encounter"))


CALLERS = ("user/Encounter.rs", "user/Encounter.rs user/Bundle.rs system/Location.rs", "user/*.rs")


def _judged(view: dict, scope: str):
    decision = _decision(scope)
    assert not decision.judges_content()
    screened = copy.deepcopy(view)
    try:
        removed = decision.screen(screened, Interaction("search", "type", "Encounter"))
    except FhirError as refused:  # a resource read alone that the caller may not see
        return refused.status
    return removed, references_in(screened), has_foreign_links(screened, UPSTREAM)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_resource, st.dictionaries(_keys, _json, max_size=6)))
@example({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Location", "id": "l"}}]})
@example({"resourceType": "Bundle", "entry": {"resource": {}}})  # not the shape: declined
def test_the_outline_judges_like_a_full_parse_or_declines(body):
    raw = orjson.dumps(body)
    view = outline(raw)
    if view is None:
        return
    full = orjson.loads(raw)
    assert references_in(view) == references_in(full)
    for scope in CALLERS:
        assert _judged(view, scope) == _judged(full, scope)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(_resource, st.dictionaries(_keys, _json, max_size=4)), min_size=1, max_size=5))
def test_an_export_batch_is_outlined_at_once_like_line_by_line(bodies):
    lines = [orjson.dumps(body) for body in bodies]
    one_by_one = [outline(line) for line in lines]
    assert outlines(b"\n".join(lines), len(lines)) == (None if None in one_by_one else one_by_one)


@pytest.mark.parametrize(
    "lines",
    [
        [b'{"resourceType":"Basic"}', b'{"resourceType":"Basic"} {"resourceType":"Basic"}'],  # two values, one line
        [b'{"resourceType":"Basic"}', b"not json"],
        [b'{"resourceType":"Basic","x":"\xff"}'],  # invalid UTF-8
    ],
)
def test_a_batch_with_a_line_the_outline_cannot_take_is_declined_whole(lines):
    assert outlines(b"\n".join(lines), len(lines)) is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"resourceType":"Encounter","note":"\xff"}',  # invalid UTF-8 in a member the outline skips
        b'{"resourceType":"Encounter","x":[1,}',
        b'{"resourceType":"Encounter"} trailing',
        b"[]",
        b'{"resourceType":"Bundle","entry":[null]}',
        b'{"resourceType":"Encounter","contained":{"resourceType":"Patient"}}',
        b'{"x":' * 3000 + b"1" + b"}" * 3000,
    ],
)
def test_what_the_outline_cannot_represent_is_declined(raw):
    assert outline(raw) is None


def test_duplicate_members_count_as_in_a_full_parse():
    raw = b'{"resourceType":"Encounter","id":"a","resourceType":"Patient","id":"b"}'
    assert (
        outline(raw)
        == {"resourceType": "Patient", "id": "b"}
        == {k: v for k, v in orjson.loads(raw).items() if k in ("resourceType", "id")}
    )


def test_a_patient_app_is_judged_on_content():
    caller = Caller(subject="s", scopes=parse_scopes("patient/*.rs"), patient="p1")
    decision = decide(CallerGrants(caller, frozenset(), (), False, True), Interaction("search", "type", "Encounter"))
    assert decision.judges_content()
