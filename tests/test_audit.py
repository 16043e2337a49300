"""Audit: BALP AuditEvents without PHI, the forward-secure HMAC-chained trail, and its async sinks."""

from __future__ import annotations

import asyncio
import base64
import errno
import inspect
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, web
from fhir.resources.R4B import get_fhir_model_class

from proxy.audit import trail as trail_mod
from proxy.audit.cli import init_trail, load_key_file, verify_trail
from proxy.audit.events import Agent, audit_event
from proxy.audit.poster import FhirAuditPoster
from proxy.audit.trail import (
    AsyncAuditSink,
    AuditTrail,
    AuditUnavailable,
    AuditWriteError,
    TrailCorrupt,
    TrailLocked,
    canonical,
    encode_record,
    new_initial_key,
    ratchet,
    read_state,
    record_mac,
    verify,
)

AuditEventModel = get_fhir_model_class("AuditEvent")

# PHI that a real request in this scenario would carry. None of it is ever handed to the builder:
# the proxy passes references, group names and the rewritten (blind-index) query only.
NIK = "3171234567890001"
NAME = "Siti Nurhaliza"
BIRTH_DATE = "1987-04-12"
PHI = (NIK, NAME, BIRTH_DATE, "Nurhaliza", "Jl. Merdeka")
BLIND_QUERY = (
    "identifier=https%3A%2F%2Ffhircrypt.dev%2Ffhir%2Fblind-index%2FPatient%2Fnik%2Fidentifier"
    "%7C9f2c1e0b7a6d5c4b3a29180716f5e4d3&_count=10"
)
USER = Agent(
    subject="dr-ayu",
    client_id="emr-app",
    fhir_user="Practitioner/pr-7",
    roles=("physician",),
    network_address="10.1.2.3",
    token_id="jti-42",
)
WHEN = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _event(i: int = 0, **overrides) -> dict:
    args = dict(
        action="E",
        interaction="search-type",
        status=200,
        request_id=f"req-{i}",
        agent=USER,
        resources=["Patient/p-1", "Observation/o-1"],
        query=BLIND_QUERY,
        decrypted_groups=["identity", "demographics"],
        masked_groups=["clinical"],
        purpose_of_use=["TREAT"],
        break_glass=False,
        integrity_failures=0,
        policy="satusehat@3f2a9c",
        source_observer="fhircrypt-proxy-1",
        recorded=WHEN,
    )
    args.update(overrides)
    return audit_event(**args)


def _valid(event: dict) -> None:
    AuditEventModel.model_validate(event)


def _codings(concept: dict) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept["coding"]}


# --- AuditEvent ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "interaction", "resources", "query"),
    [
        ("R", "read", ["Patient/p-1"], None),
        ("R", "vread", ["Observation/o-1/_history/2"], None),
        ("E", "search-type", ["Patient/p-1", "Patient/p-2"], BLIND_QUERY),
        ("E", "search-system", [], "_type=Patient&_count=5"),
        ("C", "create", ["Observation/o-9"], None),
        ("U", "update", ["Patient/p-1"], None),
        ("U", "patch", ["Patient/p-1"], None),
        ("D", "delete", ["Encounter/e-1"], None),
        ("R", "history-instance", ["Patient/p-1"], None),
        ("R", "capabilities", [], None),
        ("E", "transaction", ["Patient/p-1", "Observation/o-1"], None),
        ("E", "operation", [], None),
    ],
)
def test_audit_event_is_valid_r4(action, interaction, resources, query):
    event = _event(action=action, interaction=interaction, resources=resources, query=query)
    _valid(event)
    assert event["action"] == action
    assert event["subtype"][0] == {
        "system": "http://hl7.org/fhir/restful-interaction",
        "code": interaction,
        "display": interaction,
    }


def test_anonymous_caller_is_still_a_valid_event():
    event = _event(agent=Agent(), purpose_of_use=[], decrypted_groups=[], masked_groups=[], query=None)
    _valid(event)
    client = event["agent"][0]
    assert client["requestor"] is True and client["who"] == {"display": "unidentified client"}
    assert "purposeOfEvent" not in event


def test_balp_codes():
    event = _event()
    assert event["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "Restful Operation",
    }
    assert event["recorded"] == "2025-01-02T03:04:05.678Z"
    assert event["outcome"] == "0"

    user, client, proxy = event["agent"]
    assert _codings(user["type"]) == {
        ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP"),
        ("https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes", "UserOauthAgent"),
    }
    assert user["who"] == {"reference": "Practitioner/pr-7", "identifier": {"value": "dr-ayu"}}
    assert user["requestor"] is True and user["name"] == "dr-ayu" and user["policy"] == ["jti-42"]
    assert [r["text"] for r in user["role"]] == ["physician"]
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"

    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    assert _codings(client["type"]) == {(dcm, "110153"), (dcm, "110150")}
    assert client["who"] == {"identifier": {"value": "emr-app"}}
    assert client["network"] == {"address": "10.1.2.3", "type": "2"} and client["requestor"] is False
    assert _codings(proxy["type"]) == {(dcm, "110152")}
    assert proxy["who"] == {"display": "fhircrypt-proxy-1"} and proxy["requestor"] is False

    assert event["source"]["observer"] == {"display": "fhircrypt-proxy-1"}
    assert event["source"]["type"][0]["code"] == "4"
    assert event["purposeOfEvent"] == [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}
    ]

    query, patient, observation, request = event["entity"]
    assert (query["type"]["code"], query["role"]["code"]) == ("2", "24")
    assert base64.b64decode(query["query"]).decode() == BLIND_QUERY
    assert patient["what"] == {"reference": "Patient/p-1"}
    assert (patient["type"]["code"], patient["role"]["code"]) == ("1", "1")
    assert observation["what"] == {"reference": "Observation/o-1"}
    assert (observation["type"]["code"], observation["role"]["code"]) == ("2", "4")
    assert request["type"] == {
        "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
        "code": "XrequestId",
    }
    assert request["what"] == {"identifier": {"value": "req-0"}}
    assert {d["type"]: d["valueString"] for d in request["detail"]} == {
        "policy": "satusehat@3f2a9c",
        "decrypted-groups": "demographics,identity",
        "masked-groups": "clinical",
        "integrity-failures": "0",
    }


def test_writes_name_the_user_as_author():
    user = _event(action="C", interaction="create", query=None)["agent"][0]
    assert ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT") in _codings(user["type"])


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "0"), (201, "0"), (304, "0"), (401, "4"), (404, "4"), (502, "8"), (503, "8"), (0, "12")],
)
def test_outcome_follows_status(status, outcome):
    event = _event(status=status)
    assert event["outcome"] == outcome and str(status) in event["outcomeDesc"]
    _valid(event)


def test_break_glass_is_marked_high_severity():
    event = _event(break_glass=True, integrity_failures=2)
    _valid(event)
    codes = [c["coding"][0]["code"] for c in event["purposeOfEvent"]]
    assert codes == ["TREAT", "ETREAT", "BTG"]
    assert event["agent"][0]["purposeOfUse"] == event["purposeOfEvent"]
    assert {"system": "https://fhircrypt.dev/fhir/CodeSystem/audit-event-subtype", "code": "break-glass"}.items() <= (
        event["subtype"][1].items()
    )
    assert event["extension"] == [
        {"url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-AuditEvent.severity", "valueCode": "alert"}
    ]
    details = {d["type"]: d["valueString"] for d in event["entity"][-1]["detail"]}
    assert details["break-glass"] == "true" and details["integrity-failures"] == "2"


def _leaves(node, key: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v, key)
    else:
        yield key, node


def test_event_holds_nothing_but_its_inputs_and_fixed_vocabulary():
    event = _event(break_glass=True)
    blob = orjson.dumps(event).decode()
    assert not [p for p in PHI if p in blob]

    inputs = {
        "req-0",
        "dr-ayu",
        "emr-app",
        "Practitioner/pr-7",
        "physician",
        "10.1.2.3",
        "jti-42",
        "Patient/p-1",
        "Observation/o-1",
        "satusehat@3f2a9c",
        "fhircrypt-proxy-1",
        base64.b64encode(BLIND_QUERY.encode()).decode(),
    }
    derived = {"demographics,identity", "clinical", "0", "true", "2025-01-02T03:04:05.678Z", "HTTP 200"}
    vocabulary_keys = {"system", "code", "display", "url", "valueCode", "resourceType", "action", "outcome", "type"}
    fixed_texts = {"unidentified client"}
    for key, value in _leaves(event):
        if isinstance(value, bool) or key in vocabulary_keys:
            continue
        assert value in inputs | derived | fixed_texts, (key, value)


def test_builder_accepts_no_bodies_and_refuses_values():
    params = set(inspect.signature(audit_event).parameters)
    assert params == {
        "action",
        "interaction",
        "status",
        "request_id",
        "record_id",
        "agent",
        "resources",
        "query",
        "decrypted_groups",
        "masked_groups",
        "purpose_of_use",
        "break_glass",
        "integrity_failures",
        "policy",
        "source_observer",
        "recorded",
    }
    patient_body = {"resourceType": "Patient", "id": "p-1", "identifier": [{"value": NIK}]}
    bad = [
        {"resources": [patient_body]},
        {"resources": [f"Patient/{NIK} {NAME}"]},
        {"resources": [NAME]},
        {"decrypted_groups": [NAME]},
        {"masked_groups": [BIRTH_DATE + " x"]},
        {"purpose_of_use": ["treat me"]},
        {"request_id": NAME},
        {"action": "X"},
        {"interaction": "read-everything"},
        {"policy": "no-sha"},
        {"integrity_failures": -1},
        {"recorded": datetime(2025, 1, 1)},  # naive time
        {"agent": Agent(subject="x" * 300)},
        {"agent": Agent(roles=(NAME,))},
    ]
    for override in bad:
        with pytest.raises(ValueError):
            _event(**override)


# --- the trail ------------------------------------------------------------------------------------

N = 50


@pytest.fixture
def written(tmp_path: Path):
    """A trail of N records; returns (trail path, state path, K_0, the events)."""
    path, state = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.state"
    k0 = new_initial_key()
    events = [_event(i) for i in range(N)]
    with AuditTrail(path, state).create(k0) as trail:
        for ev in events:
            trail.append(ev)
    return path, state, k0, events


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in _lines(path)]


def _broken_at(result, record: int, *words: str) -> None:
    assert not result.ok, result
    assert result.first_bad == record, result
    assert result.records == record
    for w in words:
        assert w in result.reason, result


def test_chain_verifies(written):
    path, state, k0, events = written
    result = verify(path, k0)
    assert result.ok and result.records == N and result.first_bad is None
    assert str(result) == f"OK: {N} records"
    assert verify(path, k0, state_path=state).ok
    assert [r["event"] for r in _records(path)] == events
    assert [r["seq"] for r in _records(path)] == list(range(N))
    recs = _records(path)
    assert recs[0]["prev"] == "" and all(recs[i]["prev"] == recs[i - 1]["mac"] for i in range(1, N))


def test_trail_and_state_hold_no_phi(written):
    path, state, _, _ = written
    blob = path.read_text() + state.read_text()
    assert not [p for p in PHI if p in blob]


def test_wrong_initial_key_breaks_at_record_0(written):
    path, _, _, _ = written
    _broken_at(verify(path, new_initial_key()), 0, "MAC mismatch")


def _edit_field(lines: list[bytes]) -> list[bytes]:
    rec = orjson.loads(lines[17])
    rec["event"]["entity"][1]["what"]["reference"] = "Patient/someone-else"
    lines[17] = canonical(rec) + b"\n"
    return lines


def _edit_outcome(lines: list[bytes]) -> list[bytes]:
    rec = orjson.loads(lines[17])
    rec["event"]["outcome"] = "4"
    lines[17] = canonical(rec) + b"\n"
    return lines


def _reformat(lines: list[bytes]) -> list[bytes]:
    lines[17] = orjson.dumps(orjson.loads(lines[17]), option=orjson.OPT_INDENT_2).replace(b"\n", b" ") + b"\n"
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[17]
    return lines


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[17], lines[18] = lines[18], lines[17]
    return lines


def _duplicate(lines: list[bytes]) -> list[bytes]:
    lines.insert(18, lines[17])
    return lines


def _renumber_after_delete(lines: list[bytes]) -> list[bytes]:
    """Delete record 17 and renumber the rest, keeping their MACs: prev/MAC break at 17."""
    del lines[17]
    out = lines[:17]
    for i, line in enumerate(lines[17:], 17):
        rec = orjson.loads(line)
        rec["seq"] = i
        out.append(canonical(rec) + b"\n")
    return out


@pytest.mark.parametrize(
    ("tamper", "first_bad", "line", "words"),
    [
        (_edit_field, 17, 18, ("MAC mismatch",)),
        (_edit_outcome, 17, 18, ("MAC mismatch",)),
        (_reformat, 17, 18, ("canonical",)),
        (_delete, 17, 18, ("seq 18", "deleted")),
        (_swap, 17, 18, ("seq 18",)),
        (_duplicate, 18, 19, ("seq 17", "duplicated")),
        (_renumber_after_delete, 17, 18, ("prev",)),
    ],
)
def test_tampering_is_detected_at_the_first_broken_record(written, tamper, first_bad, line, words):
    path, _, k0, _ = written
    path.write_bytes(b"".join(tamper(_lines(path))))
    result = verify(path, k0)
    _broken_at(result, first_bad, *words)
    assert result.line == line
    assert str(result).startswith(f"BROKEN at record {first_bad} (line {line}): ")


def test_truncation_mid_line_is_detected(written):
    path, _, k0, _ = written
    lines = _lines(path)
    cut = sum(len(x) for x in lines[:30]) + len(lines[30]) // 2
    path.write_bytes(path.read_bytes()[:cut])
    result = verify(path, k0)
    _broken_at(result, 30, "truncated")
    assert result.line == 31


@pytest.mark.parametrize("garbage", [b"garbage\n", b"{}\n", b"\n", b'{"seq": 50', b"[1, 2]\n"])
def test_appended_garbage_is_detected(written, garbage):
    path, _, k0, _ = written
    with path.open("ab") as f:
        f.write(garbage)
    result = verify(path, k0)
    _broken_at(result, N)
    assert result.line == N + 1


def test_a_stolen_current_key_cannot_rewrite_history(written):
    """The thief has the state file (K_50); every attempt on records 0..49 is detected."""
    path, state, k0, _ = written
    stolen = read_state(state)["key"]
    original = _lines(path)

    # Forge record 17: new content, MAC computed with the stolen key, chain fields kept.
    rec = orjson.loads(original[17])
    rec["event"]["entity"][1]["what"]["reference"] = "Patient/someone-else"
    forged, _ = encode_record(stolen, 17, rec["prev"], rec["event"])
    path.write_bytes(b"".join([*original[:17], forged, *original[18:]]))
    _broken_at(verify(path, k0), 17, "MAC mismatch")

    # Delete record 17 and re-chain everything after it with keys ratcheted from the stolen one.
    lines, prev, key = original[:17], orjson.loads(original[16])["mac"], stolen
    for seq, line in enumerate(original[18:], 17):
        new, prev = encode_record(key, seq, prev, orjson.loads(line)["event"])
        lines.append(new)
        key = ratchet(key)
    path.write_bytes(b"".join(lines))
    _broken_at(verify(path, k0), 17, "MAC mismatch")

    # Append a forged copy of an old record (a replay) claiming its original position.
    rec = orjson.loads(original[3])
    replay, _ = encode_record(stolen, 3, rec["prev"], rec["event"])
    path.write_bytes(b"".join(original) + replay)
    _broken_at(verify(path, k0), N, "seq 3")


def test_the_ratchet_is_forward_secure(written):
    path, state, k0, _ = written
    current = read_state(state)["key"]
    key = k0
    for _ in range(N):
        key = ratchet(key)
    assert current == key != k0  # the state holds K_50, never K_0
    records, original = _records(path), _lines(path)
    for j in range(N):
        rec = records[j]
        assert record_mac(current, j, rec["prev"], rec["event"]) != rec["mac"]
        forged, _ = encode_record(current, j, rec["prev"], rec["event"])
        lines = list(original)
        lines[j] = forged
        path.write_bytes(b"".join(lines))
        _broken_at(verify(path, k0), j, "MAC mismatch")
    # and with the real keys the same records verify
    path.write_bytes(b"".join(original))
    assert verify(path, k0).ok


def test_what_a_current_key_thief_can_do_is_caught_by_the_state_or_the_writer(written):
    """The limit of forward security, made explicit: K_50 extends the chain. verify alone accepts
    a record 50 made with it; checking against the writer's state file exposes it, and the
    running writer refuses to continue after it (so the sink backs up and fails closed)."""
    path, state, k0, _ = written
    stolen = read_state(state)["key"]
    last = _records(path)[-1]
    extra, _ = encode_record(stolen, N, last["mac"], _event(999, resources=["Patient/fake"]))
    clean = path.read_bytes()
    path.write_bytes(clean + extra)
    assert verify(path, k0).ok  # indistinguishable from the writer without outside evidence
    result = verify(path, k0, state_path=state)
    assert not result.ok and result.first_bad == N and "someone else" in result.reason

    path.write_bytes(clean)
    trail = AuditTrail(path, state).open()
    try:
        with path.open("ab") as f:
            f.write(extra)
        with pytest.raises(TrailCorrupt):
            trail.append(_event(N))
    finally:
        trail.close()


def test_records_cut_from_the_end_are_caught_by_the_state(written):
    path, state, k0, _ = written
    path.write_bytes(b"".join(_lines(path)[:-3]))
    assert verify(path, k0).ok  # a clean prefix: only the state (or a checkpoint) knows more existed
    _broken_at(verify(path, k0, state_path=state), N - 3, "removed from the end")
    with pytest.raises(TrailCorrupt, match="shorter"):
        AuditTrail(path, state).open()


def test_resume_after_restart(written):
    path, state, k0, _ = written
    with AuditTrail(path, state).open() as trail:
        assert trail.next_seq == N
        for i in range(N, N + 5):
            trail.append(_event(i))
    result = verify(path, k0, state_path=state)
    assert result.ok and result.records == N + 5


def test_files_are_private(written):
    path, state, _, _ = written
    for f in (path, state):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_one_writer_per_trail(written):
    path, state, _, _ = written
    with AuditTrail(path, state).open(), pytest.raises(TrailLocked):
        AuditTrail(path, state).open()


def test_create_refuses_existing_trail(written, tmp_path):
    path, state, _, _ = written
    with pytest.raises(FileExistsError):
        AuditTrail(path, state).create(new_initial_key())
    with pytest.raises(FileExistsError):
        AuditTrail(path, tmp_path / "other.state").create(new_initial_key())


def test_crash_before_the_state_update_is_reconciled(written):
    path, state, k0, _ = written
    old_state = state.read_bytes()
    with AuditTrail(path, state).open() as trail:
        trail.append_many([_event(i) for i in range(N, N + 3)])
    state.write_bytes(old_state)  # as if the process died between the fsync and the state update
    with AuditTrail(path, state).open() as trail:
        assert trail.next_seq == N + 3
        trail.append(_event(N + 3))
    result = verify(path, k0, state_path=state)
    assert result.ok and result.records == N + 4


def test_crash_mid_write_leaves_a_torn_record_that_is_moved_aside(written):
    path, state, k0, _ = written
    with path.open("ab") as f:
        f.write(b'{"event":{"resourceType":"Audit')
    assert not verify(path, k0).ok
    with AuditTrail(path, state).open() as trail:
        trail.append(_event(N))
    assert verify(path, k0, state_path=state).ok
    torn = list(path.parent.glob("audit.jsonl.torn-*"))
    assert len(torn) == 1 and torn[0].read_bytes().startswith(b'{"event"')


def test_foreign_complete_lines_refuse_open(written):
    path, state, _, _ = written
    with path.open("ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(TrailCorrupt, match="did not write"):
        AuditTrail(path, state).open()


def test_batch_fsync_mode_is_all_or_nothing(tmp_path, monkeypatch):
    path, state, k0 = tmp_path / "t.jsonl", tmp_path / "t.state", new_initial_key()
    with AuditTrail(path, state, fsync="batch").create(k0) as trail:
        trail.append_many([_event(i) for i in range(10)])
        monkeypatch.setattr(trail_mod, "_write_all", _half_then_fail(trail_mod._write_all, 1))
        with pytest.raises(AuditWriteError) as err:
            trail.append_many([_event(i) for i in range(10, 15)])
        assert err.value.written == 0
        trail.append_many([_event(i) for i in range(10, 15)])
    result = verify(path, k0, state_path=state)
    assert result.ok and result.records == 15
    assert [r["event"]["entity"][-1]["what"]["identifier"]["value"] for r in _records(path)] == [
        f"req-{i}" for i in range(15)
    ]


def test_record_fsync_mode_reports_partial_progress(tmp_path, monkeypatch):
    path, state, k0 = tmp_path / "t.jsonl", tmp_path / "t.state", new_initial_key()
    real = trail_mod._write_all
    calls = {"n": 0}

    def third_fails(fd, data):
        calls["n"] += _is_record(data)
        if calls["n"] == 3 and _is_record(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    with AuditTrail(path, state).create(k0) as trail:
        monkeypatch.setattr(trail_mod, "_write_all", third_fails)
        with pytest.raises(AuditWriteError) as err:
            trail.append_many([_event(i) for i in range(5)])
        assert err.value.written == 2
        trail.append_many([_event(i) for i in range(2, 5)])
    assert verify(path, k0, state_path=state).records == 5


def test_a_failed_state_write_does_not_duplicate_records(tmp_path, monkeypatch, caplog):
    path, state, k0 = tmp_path / "t.jsonl", tmp_path / "t.state", new_initial_key()
    real = trail_mod._write_all
    outage = {"on": True}

    def state_disk(fd, data):
        if outage["on"] and not _is_record(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    with AuditTrail(path, state).create(k0) as trail:
        monkeypatch.setattr(trail_mod, "_write_all", state_disk)
        with caplog.at_level(logging.ERROR, logger="fhircrypt.audit"):
            trail.append_many([_event(i) for i in range(3)])  # records durable: no error for the caller
        assert "audit state file write failed" in caplog.text
        assert read_state(state)["next_seq"] == 0
        outage["on"] = False
        trail.append(_event(3))
    result = verify(path, k0, state_path=state)
    assert result.ok and result.records == 4


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_init_and_verify(tmp_path, capsys):
    path, key_file = tmp_path / "audit.jsonl", tmp_path / "k0.key"
    init_trail(path, key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert path.exists() and path.stat().st_size == 0
    with pytest.raises(FileExistsError):
        init_trail(path, key_file)
    with pytest.raises(FileExistsError):
        init_trail(tmp_path / "other.jsonl", key_file)
    capsys.readouterr()

    with AuditTrail(path).open() as trail:
        for i in range(20):
            trail.append(_event(i))
    assert read_state(trail_mod.default_state_path(path))["key"] != load_key_file(key_file)
    assert verify_trail(path, key_file) == 0
    assert capsys.readouterr().out.strip() == "OK: 20 records"

    lines = _lines(path)
    lines[7], lines[8] = lines[8], lines[7]
    path.write_bytes(b"".join(lines))
    assert verify_trail(path, key_file) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("BROKEN at record 7 (line 8): seq 8 where 7 was expected")

    assert verify_trail(path, tmp_path / "missing.key") == 1
    assert "ERROR" in capsys.readouterr().err


# --- async sink -----------------------------------------------------------------------------------


def _is_record(data) -> bool:
    """Trail writes (as opposed to state-file writes): faults are aimed at the trail."""
    return bytes(data[:9]) == b'{"event":'


def _half_then_fail(real, failures: int):
    """A disk that accepts half of the next ``failures`` trail writes and then reports ENOSPC."""
    left = {"n": failures}

    def fake(fd, data):
        if left["n"] > 0 and _is_record(data):
            left["n"] -= 1
            real(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    return fake


def _ids(path: Path) -> list[str]:
    return [r["event"]["entity"][-1]["what"]["identifier"]["value"] for r in _records(path)]


@pytest.fixture
def fresh(tmp_path: Path):
    path, state, k0 = tmp_path / "a.jsonl", tmp_path / "a.state", new_initial_key()
    trail = AuditTrail(path, state).create(k0)
    yield trail, path, state, k0
    trail.close()


async def test_sink_writes_in_order(fresh):
    trail, path, state, k0 = fresh
    sink = await AsyncAuditSink(trail, batch_size=7).start()
    for i in range(40):
        sink.emit(_event(i))
    assert await sink.close() == 0
    assert sink.written == 40 and sink.backlog == 0
    assert _ids(path) == [f"req-{i}" for i in range(40)]
    assert verify(path, k0, state_path=state).ok


async def test_fail_closed_when_the_backlog_is_full(fresh):
    trail, path, _, _ = fresh
    sink = AsyncAuditSink(trail, max_backlog=3)  # not started: nothing drains
    for i in range(3):
        sink.emit(_event(i))
    assert sink.backlog == 3 and not sink.available
    with pytest.raises(AuditUnavailable):
        sink.emit(_event(3))
    await sink.start()
    for _ in range(100):
        if sink.available and sink.backlog == 0:
            break
        await asyncio.sleep(0.01)
    sink.emit(_event(3))
    assert await sink.close() == 0
    assert _ids(path) == ["req-0", "req-1", "req-2", "req-3"]
    assert sink.dropped == 0
    with pytest.raises(AuditUnavailable):
        sink.emit(_event(4))  # closed


async def test_continue_mode_drops_counts_and_logs_once(fresh, caplog):
    trail, path, _, _ = fresh
    sink = AsyncAuditSink(trail, max_backlog=2, mode="continue")
    with caplog.at_level(logging.ERROR, logger="fhircrypt.audit"):
        for i in range(6):
            sink.emit(_event(i))
    assert sink.backlog == 2 and sink.dropped == 4
    drops = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert len(drops) == 1
    assert not [p for p in PHI if p in caplog.text]
    await sink.start()
    assert await sink.close() == 0
    assert _ids(path) == ["req-0", "req-1"]


async def test_a_failing_disk_loses_nothing_and_keeps_order(fresh, monkeypatch, caplog):
    trail, path, state, k0 = fresh
    monkeypatch.setattr(trail_mod, "_write_all", _half_then_fail(trail_mod._write_all, 4))
    sink = await AsyncAuditSink(trail, retry_initial=0.001, retry_max=0.01, batch_size=5).start()
    with caplog.at_level(logging.WARNING, logger="fhircrypt.audit"):
        for i in range(30):
            sink.emit(_event(i))
            if i % 7 == 0:
                await asyncio.sleep(0)
        assert await sink.close() == 0
    assert _ids(path) == [f"req-{i}" for i in range(30)]
    assert verify(path, k0, state_path=state).records == 30
    messages = [r.getMessage() for r in caplog.records]
    assert "audit sink write failed; records kept and retried" in messages
    assert "audit sink recovered" in messages


async def test_a_failing_disk_fills_the_backlog_then_fails_closed(fresh, monkeypatch):
    trail, path, _, _ = fresh
    outage = {"on": True}
    real = trail_mod._write_all

    def disk(fd, data):
        if outage["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(trail_mod, "_write_all", disk)
    sink = await AsyncAuditSink(trail, max_backlog=5, retry_initial=0.001, retry_max=0.005).start()
    for i in range(5):
        sink.emit(_event(i))
    await asyncio.sleep(0.05)
    assert sink.failing and sink.backlog == 5
    with pytest.raises(AuditUnavailable):
        sink.emit(_event(5))
    outage["on"] = False
    assert await sink.close() == 0
    assert _ids(path) == [f"req-{i}" for i in range(5)]


async def test_close_reports_what_could_not_be_written(fresh, monkeypatch):
    trail, _, _, _ = fresh

    def dead(fd, data):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(trail_mod, "_write_all", dead)
    sink = await AsyncAuditSink(trail, retry_initial=0.001, retry_max=0.005).start()
    for i in range(3):
        sink.emit(_event(i))
    assert await sink.close(timeout=0.05) == 3


async def test_unserialisable_events_are_refused_at_emit(fresh):
    trail, _, _, _ = fresh
    sink = AsyncAuditSink(trail)
    with pytest.raises(TypeError):
        sink.emit({"resourceType": "AuditEvent", "bad": object()})
    assert sink.backlog == 0


# --- FHIR server sink -----------------------------------------------------------------------------


async def test_fhir_poster_delivers_in_order_through_outages(aiohttp_server):
    received: list[dict] = []
    failures = {"left": 2}

    async def post_audit_event(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/fhir+json"
        assert request.headers["Authorization"] == "Bearer audit-token"
        if failures["left"]:
            failures["left"] -= 1
            return web.Response(status=503)
        body = await request.json()
        received.append(body)
        return web.json_response({**body, "id": str(len(received))}, status=201)

    app = web.Application()
    app.router.add_post("/fhir/AuditEvent", post_audit_event)
    server = await aiohttp_server(app)
    events = [_event(i) for i in range(6)]
    async with ClientSession() as session:
        poster = FhirAuditPoster(
            session.request, str(server.make_url("/fhir/")), headers={"Authorization": "Bearer audit-token"}
        )
        sink = await AsyncAuditSink(poster, name="fhir", retry_initial=0.001, retry_max=0.01).start()
        for ev in events:
            sink.emit(ev)
        assert await sink.close() == 0
    assert received == events
    for ev in received:
        _valid(ev)


async def test_fhir_poster_unreachable_server_keeps_records(unused_tcp_port):
    async with ClientSession() as session:
        poster = FhirAuditPoster(session.request, f"http://127.0.0.1:{unused_tcp_port}/fhir", timeout=1)
        with pytest.raises(AuditWriteError) as err:
            await poster.write_batch([_event(0), _event(1)])
        assert err.value.written == 0
        sink = await AsyncAuditSink(poster, retry_initial=0.001, retry_max=0.005).start()
        sink.emit(_event(0))
        await asyncio.sleep(0.05)
        assert sink.failing and sink.backlog == 1
        assert await sink.close(timeout=0.05) == 1


def test_key_file_is_strict(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_text("not a key\n")
    with pytest.raises(ValueError):
        load_key_file(key_file)
    key_file.write_text(base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=") + "\n")
    with pytest.raises(ValueError):
        load_key_file(key_file)
