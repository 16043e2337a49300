"""``fhircrypt shred``: destroy a patient's keys, and manage the legal-hold list.

    fhircrypt shred Patient/<id> [--reason CODE] [--by NAME]
    fhircrypt shred hold add Patient/<id> --until YYYY-MM-DD --reason CODE
    fhircrypt shred hold remove Patient/<id>
    fhircrypt shred hold list

Every form needs the keyring (and its KEK): the store names patients only by their keyed
tag, so ``Patient/<id>`` is turned into a tag, and hold references are sealed. Reasons are
codes (``erasure-request``, ``retention-expired``, ``litigation``…), never free text, so no
PHI ends up in the store. The command line is parsed in :mod:`proxy.cli`; each function here
is one subcommand and gets the parsed arguments and the opened keyring.
"""

from __future__ import annotations

import getpass
import os
import sys
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

from proxy import fhirgrammar as fg
from proxy.keymgmt.keyring import Keyring
from proxy.keymgmt.patientkeys import PatientKeyError, open_reference, patient_tag, seal_reference
from proxy.keystore import open_store
from proxy.keystore.base import Hold, LegalHoldActive, PatientKeyStore, now
from proxy.policy.compartment import patient_id
from proxy.settings import Settings

OPERATOR_ENV = "FHIRCRYPT_OPERATOR"


class UsageError(ValueError):
    """A command line that cannot be carried out; the message says why."""


def _patient(reference: str) -> str:
    pid = patient_id(reference) if reference.startswith("Patient/") else None
    if pid is None or reference != f"Patient/{pid}":
        raise UsageError(f"expected Patient/<id>, got '{reference[:80]}'")
    return pid


def _reason(value: str | None, default: str | None = None) -> str:
    value = value or default
    if value is None or not fg.CODE.match(value):
        raise UsageError("--reason must be a code (letters, digits, '.', '_', '-'; at most 64), not free text")
    return value


def operator(explicit: str | None) -> str:
    """Who runs the command, for the tombstone: --by, FHIRCRYPT_OPERATOR or the OS user."""
    who = explicit or os.environ.get(OPERATOR_ENV) or getpass.getuser()
    if not fg.CODE.match(who):
        raise UsageError("--by must be an account name (letters, digits, '.', '_', '-')")
    return who


@contextmanager
def _store(settings: Settings) -> Iterator[PatientKeyStore]:
    if not settings.patient_key_store:
        raise UsageError("--patient-key-store (or FHIRCRYPT_PATIENT_KEY_STORE) is required")
    store = open_store(settings.patient_key_store)
    try:
        yield store
    finally:
        store.close()


def shred(args: Namespace, settings: Settings, keyring: Keyring) -> int:
    """``shred Patient/<id>``: destroy the patient's keys, unless a legal hold is on (exit 3)."""
    with _store(settings) as store:
        reference = args.patient
        tag = patient_tag(keyring, _patient(reference))
        try:
            stone = store.shred(tag, operator(args.by), _reason(args.reason, "erasure-request"))
        except LegalHoldActive as hold:
            print(
                f"error: {reference} is on legal hold until {hold.hold.until} (reason {hold.hold.reason}); "
                "shredding refused. Remove the hold (fhircrypt shred hold remove) once retention has ended.",
                file=sys.stderr,
            )
            return 3
        print(
            f"shredded {reference}: {stone.keys_destroyed} key(s) destroyed at {stone.shredded_at} by "
            f"{stone.shredded_by} (reason {stone.reason}). Every replica stops decrypting its records within "
            f"{settings.patient_key_ttl:g} s (patient key cache age)."
        )
        unbound = store.unbound()
        if unbound:
            print(
                f"warning: {unbound} key(s) in the store belong to Patients created without an id whose create "
                "response the proxy never saw; they are bound (and then shredded) only once the Patient is read "
                "through the proxy. If this patient may be one of them, read it through the proxy and shred again.",
                file=sys.stderr,
            )
        return 0


def hold_list(args: Namespace, settings: Settings, keyring: Keyring) -> int:
    """``shred hold list``: every hold, its patient opened with the keyring when it can be."""
    with _store(settings) as store:
        for hold in store.holds():
            try:
                who = open_reference(keyring, hold.tag, hold.patient)
            except PatientKeyError:
                who = f"(tag {hold.tag[:12]}…: sealed by another keyring)"
            print(f"{who}  until {hold.until}  reason {hold.reason}  added {hold.added_at} by {hold.added_by}")
        return 0


def hold_remove(args: Namespace, settings: Settings, keyring: Keyring) -> int:
    with _store(settings) as store:
        reference = args.patient
        removed = store.remove_hold(patient_tag(keyring, _patient(reference)))
        print(f"legal hold on {reference} removed" if removed else f"{reference} has no legal hold")
        return 0


def hold_add(args: Namespace, settings: Settings, keyring: Keyring) -> int:
    """``shred hold add``: refuse shredding the patient until the given day (not for one already shredded)."""
    with _store(settings) as store:
        reference = args.patient
        tag = patient_tag(keyring, _patient(reference))
        try:
            end = date.fromisoformat(args.until or "")
        except ValueError:
            raise UsageError("--until YYYY-MM-DD is required (the last day of the hold)") from None
        if end < datetime.now(UTC).date():
            raise UsageError("--until is in the past")
        stone = store.tombstone(tag)
        if stone is not None:
            raise UsageError(f"{reference} was already shredded at {stone.shredded_at}: a hold cannot bring it back")
        sealed = seal_reference(keyring, tag, reference)
        reason = _reason(args.reason)
        store.add_hold(Hold(tag, sealed, end.isoformat(), reason, operator(args.by), now()))
        print(
            f"legal hold on {reference} until {end.isoformat()} (reason {reason}): shredding it is refused until then"
        )
        return 0
