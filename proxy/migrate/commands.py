"""``fhircrypt reencrypt`` and ``fhircrypt keys retire``: the reports and exit codes around the walks.

Exit codes: 0 everything done (or, for a dry run, nothing failed); 1 something remains
(plaintext, old keys or policies, integrity failures, refused or conflicting updates) or
the retirement was refused; 3 the upstream stopped answering (resume with the same
``--checkpoint``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from proxy.keymgmt.keyring import Keyring, update_keyring
from proxy.keymgmt.providers.base import KeyProvider
from proxy.migrate.assess import Plan, State, envelope_key_ids
from proxy.migrate.checkpoint import Checkpoint
from proxy.migrate.run import WRITTEN, KeyUsage, Options, Reencryption, Tally, walk
from proxy.migrate.upstream import Upstream, UpstreamDown
from proxy.migrate.walker import history
from proxy.policy.definitions import resource_types

ABSTRACT = frozenset({"Resource", "DomainResource", "Parameters"})  # never stored as such
PENDING = (State.PLAINTEXT, State.OLD_KEY, State.OLD_POLICY)
PATIENT_KEY_PREFIX = "p_"  # envelope key ids of per-patient keys (crypto-shredding) start with it


def every_type() -> tuple[str, ...]:
    return tuple(sorted(resource_types() - ABSTRACT))


@dataclass(frozen=True)
class Connection:
    upstream: str
    rate: float | None = None
    token: str | None = None  # bearer token for the upstream, from the environment only
    ca_file: str | None = None
    timeout: float = 60.0  # seconds per request attempt

    def open(self, workers: int) -> Upstream:
        return Upstream(
            self.upstream, self.rate, self.token, self.ca_file, timeout=self.timeout, connections=max(workers, 2)
        )


def remaining(tally: Tally) -> dict[str, dict[str, int]]:
    """What is left to do, by type: not written (dry run, refused, conflicting) or failing verification."""
    out: dict[str, dict[str, int]] = {}
    for rtype, counts in tally.by_type.items():
        left = {s.value: counts[f"left.{s.value}"] for s in PENDING if counts[f"left.{s.value}"]}
        if counts[State.FAILED.value]:
            left[State.FAILED.value] = counts[State.FAILED.value]
        if left:
            out[rtype] = left
    return out


def _summary_line(rtype: str, counts: dict) -> str:
    shown = ["scanned", *(s.value for s in (State.CURRENT, *PENDING, State.FAILED)), *WRITTEN.values()]
    shown += ["conflicts", "made-current-by-writer", "gone", "other-shard"]
    parts = [f"{k} {counts[k]}" for k in shown if counts.get(k)]
    reasons = [f"{k[8:]} ({v})" for k, v in counts.items() if k.startswith("reason: ")]
    return f"  {rtype}: {', '.join(parts) or 'nothing'}" + (f"; reasons: {'; '.join(reasons)}" if reasons else "")


async def reencrypt(
    conn: Connection, plan: Plan, opts: Options, checkpoint_path: str | None, report_path: str | None
) -> int:
    run = {
        "policy": plan.policy.digest,
        "previous": plan.previous.digest if plan.previous else None,
        "primary": plan.keyring.primary_id,
        "retiring": sorted(plan.retiring),
        "to_primary": plan.to_primary,
        "types": list(opts.types),
        "shard": list(opts.shard) if opts.shard else None,
        "dry_run": opts.dry_run,
    }
    checkpoint = Checkpoint(checkpoint_path, run).load()
    tally = Tally(checkpoint.tally)
    checkpoint.snapshot = tally.to_doc  # the checkpoint saves the live counters after every page
    up = conn.open(opts.workers)
    job = Reencryption(up, plan, opts, tally)
    try:
        async with up:
            await walk(up, opts, checkpoint, job.handle, "dry run" if opts.dry_run else "reencrypt", tally)
    except UpstreamDown as exc:
        checkpoint.save()  # the counts of the page in flight; its cursor was not advanced, so it is redone
        print(
            f"error: the upstream stopped answering ({exc}); run again with the same --checkpoint to resume",
            file=sys.stderr,
        )
        _emit(report_path, _report(run, tally, complete=False))
        return 3
    report = _report(run, tally, complete=True)
    _emit(report_path, report)
    left = report["remaining"]
    if opts.dry_run:
        return 1 if any("failed" in v for v in left.values()) else 0
    return 1 if left else 0


def _report(run: dict, tally: Tally, complete: bool) -> dict:
    return {
        "run": run,
        "complete": complete,
        "by_type": tally.to_json(),
        "remaining": remaining(tally),
        "undone_ids": tally.ids,  # failed or not written (dry runs list none), up to Tally.MAX_IDS per type
    }


def _emit(report_path: str | None, report: dict) -> None:
    """Text summary on stderr; the JSON report to a file or stdout (``-``) for automation."""
    run = report["run"]
    head = "dry run (nothing written)" if run.get("dry_run") else "reencrypt"
    if run.get("shard"):
        head += f", shard {run['shard'][0]}/{run['shard'][1]}"
    lines = [f"{head}: {'complete' if report['complete'] else 'INTERRUPTED'}"]
    lines += [_summary_line(t, c) for t, c in report["by_type"].items()]
    left = "; ".join(f"{t}: " + ", ".join(f"{k} {n}" for k, n in c.items()) for t, c in report["remaining"].items())
    if not report["complete"]:
        lines.append("remaining: unknown, the walk did not finish" + (f" (so far: {left})" if left else ""))
    else:
        lines.append(("would change: " if run.get("dry_run") else "remaining: ") + (left or "nothing"))
    print("\n".join(lines), file=sys.stderr)
    if report_path == "-":
        print(json.dumps(report, indent=2))
    elif report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2)


async def retire(
    conn: Connection,
    keyring: Keyring,
    provider: KeyProvider,
    keyring_path: str,
    kid: str,
    types: tuple[str, ...],
    workers: int,
    report_path: str | None,
    with_history: bool = False,
) -> int:
    """Remove ``kid`` from the keyring only when a complete scan finds no current version that uses it
    (and, ``with_history``, no version in ``_history`` either)."""
    if kid not in keyring.key_ids:
        print(f"error: {kid} is not in the keyring", file=sys.stderr)
        return 2
    if kid == keyring.primary_id:
        print(f"error: {kid} is the primary key; rotate first (fhircrypt keys rotate)", file=sys.stderr)
        return 2
    tally = Tally()
    scan = KeyUsage(tally)
    up = conn.open(workers)
    opts = Options(types=types, workers=workers)
    try:
        async with up:
            await walk(up, opts, Checkpoint(None, {}), scan.handle, f"scan for {kid}", tally)
            if with_history:
                for rtype in types:
                    async for versions in history(up, rtype, opts.page_size):
                        for version in versions:
                            tally.add(rtype, "versions")
                            if kid in envelope_key_ids(version):
                                tally.add(rtype, f"history.{kid}")
    except UpstreamDown as exc:
        print(f"error: the scan could not finish ({exc}); {kid} was not retired", file=sys.stderr)
        return 3
    users = {t: c[f"key.{kid}"] for t, c in tally.by_type.items() if c[f"key.{kid}"]}
    if any(k.startswith(f"key.{PATIENT_KEY_PREFIX}") for c in tally.by_type.values() for k in c):
        # Per-patient keys are sealed by keyring keys in the patient key store, which this scan does not
        # read: retiring the key that sealed them would make those patients' data unreadable.
        print(
            f"refused: stored resources use per-patient keys, and the patient key store is not checked for "
            f"keys sealed by {kid}; retiring keyring keys is not supported with per-patient keys yet",
            file=sys.stderr,
        )
        return 1
    in_history = {t: c[f"history.{kid}"] for t, c in tally.by_type.items() if c[f"history.{kid}"]}
    report = {
        "key": kid,
        "types": list(types),
        "scanned": tally.total("scanned"),
        "in_use": users,
        "history_checked": with_history,
        "versions_scanned": tally.total("versions"),
        "in_history": in_history,
        "retired": not users and not in_history,
    }
    if report_path == "-":
        print(json.dumps(report, indent=2))
    elif report_path:
        with open(report_path, "w") as fh:
            json.dump(report, fh, indent=2)
    if users:
        named = ", ".join(f"{t} {n}" for t, n in sorted(users.items()))
        print(
            f"refused: {kid} is still used by {sum(users.values())} stored resource(s): {named}. "
            f"Run fhircrypt reencrypt --retire {kid} first.",
            file=sys.stderr,
        )
        return 1
    if in_history:
        named = ", ".join(f"{t} {n}" for t, n in sorted(in_history.items()))
        print(
            f"refused: {sum(in_history.values())} version(s) in _history still use {kid}: {named}. They cannot be "
            "re-encrypted; purge them with the server's own tools, or retire without --history and keep a "
            "backup of this keyring to read them.",
            file=sys.stderr,
        )
        return 1
    # under the lock, on the keyring as it is now: a key rotated in during the scan is kept
    keyring, _ = update_keyring(keyring_path, provider, lambda ring: ring.retire(kid))
    scope = (
        f"nor any of {tally.total('versions')} version(s) in _history"
        if with_history
        else "(versions in _history were not checked: they stay under the key and no longer decrypt)"
    )
    print(
        f"{kid} retired: no current version of {tally.total('scanned')} resource(s) in {len(types)} type(s) uses it "
        f"{scope}; keys {', '.join(keyring.key_ids)} remain (primary {keyring.primary_id})",
        file=sys.stderr,
    )
    return 0
