"""Deterministic split of the store into N shards, one per Kubernetes indexed-Job pod.

A resource belongs to shard ``sha256("<type>/<id>") mod N``. Why by id hash rather than
by type or by time range: it needs no coordination (every pod computes the same answer
alone), each resource is in exactly one shard whatever order or time the pods run in,
an id never changes (a concurrent update cannot move a resource between shards, as it
would with ``lastUpdated`` ranges), and the shards are even however skewed the types
are (one Observation type often holds most of a hospital's data, so per-type shards
would leave most pods idle). The price: every pod pages through the whole listing and
skips the resources of other shards before decrypting anything, so search reads grow N
times while the work that dominates (decryption, encryption, writes) is divided by N.
"""

from __future__ import annotations

import hashlib
import re

_SHARD = re.compile(r"^([0-9]+)/([1-9][0-9]*)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``i/N`` with 0 <= i < N (``JOB_COMPLETION_INDEX`` counts from 0)."""
    m = _SHARD.match(text.strip())
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--shard must be i/N with 0 <= i < N, not {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_of(rtype: str, rid: str, count: int) -> int:
    digest = hashlib.sha256(f"{rtype}/{rid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count
