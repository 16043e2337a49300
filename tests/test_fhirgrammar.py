"""The one FHIR grammar module: the shapes every checker shares, at their edges."""

from __future__ import annotations

import pytest

from proxy import fhirgrammar as fg
from proxy.outcome import FhirError
from proxy.policy.compartment import patient_id
from proxy.transform.interactions import classify

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (fg.ID, ["a", "A-1.b", "x" * 64], ["", "x" * 65, "a/b", "a b", "a_b", "a\n"]),
        (fg.TYPE, ["Patient", "Ab"], ["patient", "P", "Pa1", "Patient\n"]),
        (fg.REFERENCE, ["Patient/1"], ["Patient/1/_history/2", "patient/1", "Patient/", "Patient/1\n"]),
        (fg.VERSIONED_REFERENCE, ["Patient/1", "Patient/1/_history/2"], ["Patient/1/_history/", "Patient/1/x/2"]),
        (fg.OPERATION, ["$everything", "$lastn"], ["everything", "$1x", "$"]),
        (fg.PARAMETER, ["start", "_count"], ["__x", "1x", ""]),
        (fg.DATE, ["2024", "2024-05", "2024-05-06", "2024-05-06T10:11:12.5+07:00"], ["24", "2024-5", "Budi"]),
        (fg.CODE, ["treatment", "ETREAT", "a.b_c-d"], ["", ".a", "free text", "x" * 65]),
        (fg.REQUEST_ID, ["abc-123_x.y"], ["", "a b", "x" * 65, "a\n"]),
    ],
)
def test_each_shape_accepts_its_form_and_nothing_else(pattern, good, bad):
    assert all(pattern.match(v) for v in good), good
    assert not any(pattern.match(v) for v in bad), bad


def test_the_classifier_and_the_compartment_agree_on_ids():
    """One id shape: what the URL classifier takes as an id is what the compartment reads from a reference."""
    for pid in ("a", "A-1.b", "x" * 64):
        assert classify("GET", ["Patient", pid], False).id == pid
        assert patient_id(f"Patient/{pid}") == pid
    for pid in ("x" * 65, "a_b"):
        assert patient_id(f"Patient/{pid}") is None
        with pytest.raises(FhirError):
            classify("GET", ["Patient", pid], False)
