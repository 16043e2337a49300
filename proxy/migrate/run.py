"""Drive a walk over the upstream: N concurrent workers per page, checkpoint after each page, progress bar.

Two walks use it: ``reencrypt`` (assess every resource, write what needs writing with
``If-Match``) and the retirement scan of ``keys retire`` (read envelopes only). Counts are
kept per resource type in a ``Tally``; nothing in it is a value from a resource.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tqdm import tqdm

from proxy.migrate.assess import Assessment, Plan, State, assess, envelope_key_ids
from proxy.migrate.checkpoint import Checkpoint
from proxy.migrate.shards import shard_of
from proxy.migrate.upstream import Upstream, UpstreamDown
from proxy.migrate.walker import pages
from proxy.transform import jsonnum

WRITTEN = {State.PLAINTEXT: "encrypted", State.OLD_KEY: "rekeyed", State.OLD_POLICY: "repolicied"}


class Tally:
    """Counters per resource type (``Counter``s of plain strings) and the ids of resources left undone,
    kept in the checkpoint between runs. Ids are listed (up to ``MAX_IDS`` per type) so an operator
    can find what failed; values never are."""

    MAX_IDS = 1000

    def __init__(self, doc: dict | None = None) -> None:
        doc = doc or {}
        self.by_type: dict[str, Counter] = {t: Counter(c) for t, c in (doc.get("counts") or {}).items()}
        self.ids: dict[str, list[str]] = {t: list(v) for t, v in (doc.get("undone") or {}).items()}

    def add(self, rtype: str, key: str, n: int = 1) -> None:
        self.by_type.setdefault(rtype, Counter())[key] += n

    def undone(self, rtype: str, rid: str) -> None:
        ids = self.ids.setdefault(rtype, [])
        if len(ids) < self.MAX_IDS and rid not in ids:
            ids.append(rid)

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.by_type.values())

    def to_json(self) -> dict:
        return {t: dict(sorted(c.items())) for t, c in sorted(self.by_type.items())}

    def to_doc(self) -> dict:
        return {"counts": self.to_json(), "undone": self.ids}


@dataclass(frozen=True)
class Options:
    types: tuple[str, ...]
    workers: int = 8
    page_size: int = 100
    shard: tuple[int, int] | None = None
    dry_run: bool = False
    attempts: int = 5  # PUTs of one resource before a run of conflicts is reported instead


Handler = Callable[[dict], Awaitable[None]]


async def walk(
    up: Upstream,
    opts: Options,
    checkpoint: Checkpoint,
    handle: Handler,
    label: str,
    tally: Tally,
    postfix: Callable[[], dict] | None = None,
) -> None:
    """Every type's pages in turn; each page's resources concurrently; the checkpoint saved once a page is done.

    The progress bar (a terminal only) counts resources read against the server's totals,
    starting from what a resumed checkpoint already covered, with ``postfix`` (by default the
    writes and failures so far).
    """
    totals = [await up.count(t) for t in opts.types]
    total = None if None in totals else sum(t for t in totals if t is not None)
    before = tally.total("scanned") + tally.total("other-shard")
    sem = asyncio.Semaphore(opts.workers)
    bar = tqdm(total=total, initial=before, desc=label, unit="res", file=sys.stderr, disable=None, dynamic_ncols=True)

    with bar:

        async def one(resource: dict) -> None:
            async with sem:
                await handle(resource)
            bar.set_postfix(postfix() if postfix else _writes(tally), refresh=False)
            bar.update(1)

        for rtype in opts.types:
            async for batch, cursor in pages(up, rtype, checkpoint.cursor(rtype), opts.page_size):
                try:
                    async with asyncio.TaskGroup() as group:  # one failure cancels the rest of the page
                        for resource in batch:
                            group.create_task(one(resource))
                except* UpstreamDown as failed:
                    raise failed.exceptions[0] from None
                checkpoint.cursors[rtype] = cursor
                checkpoint.save()


def _writes(tally: Tally) -> dict:
    return {"written": sum(tally.total(w) for w in WRITTEN.values()), "failed": tally.total("failed")}


class Reencryption:
    """The per-resource work of ``fhircrypt reencrypt``."""

    def __init__(self, up: Upstream, plan: Plan, opts: Options, tally: Tally) -> None:
        self.up, self.plan, self.opts, self.tally = up, plan, opts, tally

    async def handle(self, resource: dict) -> None:
        rtype, rid = resource["resourceType"], str(resource.get("id"))
        if self.opts.shard and shard_of(rtype, rid, self.opts.shard[1]) != self.opts.shard[0]:
            self.tally.add(rtype, "other-shard")
            return
        self.tally.add(rtype, "scanned")
        found = assess(resource, self.plan)
        self.tally.add(rtype, found.state.value)
        if found.state is State.FAILED:
            self.tally.add(rtype, f"reason: {found.reason}")
            self.tally.undone(rtype, rid)
            return
        if found.state is State.CURRENT:
            return
        if self.opts.dry_run:
            self.tally.add(rtype, f"left.{found.state.value}")
            return
        await self._write(rtype, rid, resource, found)

    async def _write(self, rtype: str, rid: str, resource: dict, found: Assessment) -> None:
        """PUT with If-Match of the version read; on 412/409 re-read, re-assess and try again (bounded)."""
        original = found.state
        for _ in range(self.opts.attempts):
            version = str((resource.get("meta") or {}).get("versionId", ""))
            status = await self.up.update(rtype, rid, jsonnum.dumps(found.replacement), version)
            if status in (200, 201):
                self.tally.add(rtype, WRITTEN[found.state])
                return
            if status in (404, 410):
                self.tally.add(rtype, "gone")
                return
            if status not in (409, 412):
                self.tally.undone(rtype, rid)
                self.tally.add(rtype, f"left.{original.value}")
                self.tally.add(rtype, f"reason: update refused with HTTP {status}")
                return
            self.tally.add(rtype, "conflicts")
            fresh = await self.up.read(rtype, rid)
            if fresh is None:
                self.tally.add(rtype, "gone")
                return
            resource, found = fresh, assess(fresh, self.plan)
            if found.state is State.CURRENT:
                self.tally.add(rtype, "made-current-by-writer")
                return
            if found.state is State.FAILED:
                self.tally.undone(rtype, rid)
                self.tally.add(rtype, f"left.{original.value}")
                self.tally.add(rtype, f"reason: {found.reason}")
                return
        self.tally.undone(rtype, rid)
        self.tally.add(rtype, f"left.{original.value}")
        self.tally.add(rtype, f"reason: still conflicting after {self.opts.attempts} attempts")


class KeyUsage:
    """The per-resource work of the retirement scan: which key ids the current versions use."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def handle(self, resource: dict) -> None:
        rtype = resource["resourceType"]
        self.tally.add(rtype, "scanned")
        for kid in envelope_key_ids(resource):
            self.tally.add(rtype, f"key.{kid}")
