"""Name prefix search through the server's own string search: a chain of keyed prefix hashes.

With ``search: {..., prefix: N, chain: true}`` on a whole ``HumanName`` element, the stored
(encrypted) name keeps, in ``text``, ``family``, ``given``, ``prefix`` and ``suffix``, a
*chain* instead of one blind-index identifier per prefix::

    chain(part) = "fhircrypt~" + head + chunk(N+1) + chunk(N+2) + … + chunk(min(len, PREFIX_MAX))
    head        = base32(HMAC(K, fold(part)[:N]))[:20]                 -- 100 bits
    chunk(n)    = base32(HMAC(K, fold(part)[:n]))[:5]                  -- 25 bits

The chain of a search value of ``n`` characters is a prefix of the chain of every part that
starts with it, so ``family=<chain of "wir">`` finds "Wiryasentana" through the server's
ordinary string search, which matches from the start (HAPI) or anywhere (Medplum's
in-memory router): the ``fhircrypt~`` marker occurs only at the start of a chain, so a
chain can only match another chain from its start. The marker is reserved: bodies holding
it are refused like every other spelling of fhircrypt's namespace, so no stored name can
look like a chain, and a search value holding it must be a well-formed chain.
``K`` is the v2 blind-index key of the label ``<type>/<field id>/~chain``. Leakage and
false-positive rates: docs/search.md#name-chains.
"""

from __future__ import annotations

import re

from proxy.crypto.blindindex import BlindIndexer
from proxy.crypto.encoding import b32_128
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON
from proxy.transform.normalize import PREFIX_MAX, fold

MARK = mk.CHAIN_MARK
HEAD_CHARS, CHUNK_CHARS = 20, 5
PARTS = ("text", "family", "given", "prefix", "suffix")  # the string parts of a HumanName
CHAIN = re.compile(re.escape(MARK) + f"[a-z2-7]{{{HEAD_CHARS}}}(?:[a-z2-7]{{{CHUNK_CHARS}}})*")


def chain_label(rtype: str, field_id: str) -> str:
    return f"{rtype}/{field_id}/~chain"


def chains(indexer: BlindIndexer, label: str, folded: list[str], prefix_min: int) -> list[str]:
    """The chain of each folded text (one HMAC batch and one base32 batch for all of them)."""
    texts, sizes = [], []
    for part in folded:
        stop = min(len(part), PREFIX_MAX)
        own = [part[:prefix_min]] + [part[:n] for n in range(prefix_min + 1, stop + 1)]
        texts += own
        sizes.append(len(own))
    encoded = iter(b32_128(list(indexer.digests(2, label, texts))))
    out = []
    for n in sizes:
        head = next(encoded)[:HEAD_CHARS]
        out.append(MARK + head + "".join(next(encoded)[:CHUNK_CHARS] for _ in range(n - 1)))
    return out


def name_chains(name: JSON, indexer: BlindIndexer, label: str, prefix_min: int) -> JSON:
    """The clear fields of a stored HumanName: a chain in place of each string part (empty parts left out)."""
    slots: list[tuple[str, int | None]] = []
    folded: list[str] = []
    for key in PARTS:
        value = name.get(key)
        items = value if type(value) is list else [value]
        for i, item in enumerate(items):
            part = fold(item) if type(item) is str else ""
            if part:
                slots.append((key, i if type(value) is list else None))
                folded.append(part)
    out: JSON = {}
    for (key, index), chain in zip(slots, chains(indexer, label, folded, prefix_min), strict=True):
        if index is None:
            out[key] = chain
        else:
            out.setdefault(key, []).append(chain)
    return out
