"""The post-filter of chained name searches: each match the server returned is checked against its decrypted name.

A name chain (``proxy.transform.namechain``) lets the server's own string search find name prefixes,
but what it finds is not proof: chains are not covered by the record MAC (a server can copy or move
one into another record), a 25-bit chunk collides about once in 10^6 sibling comparisons, and a
server may match "contains" rather than "starts with". So when a search had chained values, every
``search.mode = match`` entry of the answer must, after decryption, have for each chained parameter
(AND) a HumanName part that parameter reads whose folded form starts with one of its values (comma =
OR); the others are removed. A value the proxy folded itself (the client's query) is compared as
text; a chain it never saw the text of (a paging link brings the rewritten query back) is compared
with the chains of the decrypted parts, which catches copied chains and contains-matching but not a
chunk collision. A name the caller reads masked has no parts, so it never matches: a caller without
the name's group cannot search by name at all (``search._check_group``: 403), and a name masked for
an integrity failure is removed like any other unproven match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.crypto.blindindex import BlindIndexer
from proxy.transform import namechain
from proxy.transform.jsontypes import JSON
from proxy.transform.normalize import fold

READS = {"name": namechain.PARTS, "family": ("family",), "given": ("given",)}  # the parts each parameter reads


@dataclass(frozen=True)
class Target:
    """A chained HumanName element a parameter reads: its key in the resource, its chain label and prefix."""

    key: str
    label: str
    prefix_min: int


@dataclass(frozen=True)
class Clause:
    """One chained parameter of a search: a match needs a part it reads starting with one of its values."""

    rtype: str
    parts: tuple[str, ...]
    targets: tuple[Target, ...]
    texts: tuple[str, ...]  # folded values from the client's query
    chains: tuple[str, ...]  # chains whose text the proxy never saw (from a paging link)

    def holds(self, resource: JSON, indexer: BlindIndexer) -> bool:
        for target in self.targets:
            folded = [f for f in map(fold, _strings(resource.get(target.key), self.parts)) if f]
            if any(f.startswith(t) for f in folded for t in self.texts):
                return True
            if self.chains and folded:
                own = namechain.chains(indexer, target.label, folded, target.prefix_min)
                if any(c.startswith(q) for c in own for q in self.chains):
                    return True
        return False


def _strings(names: object, parts: tuple[str, ...]) -> list[str]:
    """The strings of ``parts`` in a HumanName or a list of them (anything else: none)."""
    out: list[str] = []
    for name in names if type(names) is list else [names]:
        if type(name) is not dict:
            continue
        for part in parts:
            value = name.get(part)
            out += [v for v in (value if type(value) is list else [value]) if type(v) is str]
    return out


@dataclass
class Recorder:
    """Where rewriting records the chained parameters of a search (``Searcher.chained``), and the filter
    counts what it removed over a whole answer (one log line and one metric update per response)."""

    clauses: list[Clause] = field(default_factory=list)
    removed: int = 0

    def query(self, rtype: str | None) -> NameQuery | None:
        """The filter for a search of ``rtype``; None when it had no chained value (no cost at all)."""
        own = tuple(c for c in self.clauses if c.rtype == rtype)
        return NameQuery(own) if own else None


@dataclass(frozen=True)
class NameQuery:
    clauses: tuple[Clause, ...]

    def matches(self, resource: JSON, indexer: BlindIndexer) -> bool:
        return all(c.holds(resource, indexer) for c in self.clauses)

    def filter_page(self, bundle: JSON, indexer: BlindIndexer) -> int:
        """Remove the match entries of a decrypted searchset (or a part of one) that do not match, in place;
        the number removed. A page that lost an entry loses its ``total``: the server counted it."""
        entries = bundle.get("entry")
        if type(entries) is not list:
            return 0
        rtype = self.clauses[0].rtype
        kept = [e for e in entries if not _is_match(e, rtype) or self.matches(e["resource"], indexer)]
        removed = len(entries) - len(kept)
        if removed:
            bundle["entry"] = kept
            bundle.pop("total", None)
        return removed


def _is_match(entry: object, rtype: str) -> bool:
    """An entry of the searched type not marked ``include`` (or ``outcome``): a match, also when the server
    left out ``search.mode``, so that leaving it out is no way around the filter."""
    if type(entry) is not dict or type(entry.get("resource")) is not dict:
        return False
    search = entry.get("search")
    mode = search.get("mode") if type(search) is dict else None
    return entry["resource"].get("resourceType") == rtype and mode not in ("include", "outcome")
