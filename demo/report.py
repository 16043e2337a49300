"""What the demo prints: a summary table, the at-rest scan, and side-by-side views.

The default output fits a screen or two: one row per resource with the number of
encrypted elements and blind-index search tokens the server stores, and how many of the
sample's plaintext PHI values were found anywhere at the server (every stored version);
then one short side-by-side excerpt of the Patient. ``--full`` shows every resource.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from proxy.transform import markers as mk
from proxy.transform.markers import INDEX_BASES

if TYPE_CHECKING:
    from demo.scenario import Written

EXCERPT = ("identifier", "name", "birthDate")  # the Patient elements of the short side-by-side view


def header(proxy: str, upstream: str, policy_name: str, organization_id: str) -> str:
    return (
        "fhircrypt demo\n"
        f"  FHIR server (Medplum, in memory, test only): {upstream}\n"
        f"  fhircrypt proxy: {proxy}\n"
        f"  policy: policies/satusehat.yaml ({policy_name}), the hospital being Organization/{organization_id}\n"
        "  development mode (--auth none): every element is decrypted for every caller\n\n"
        "One SATUSEHAT-style transaction Bundle (urn:uuid: links) written through fhircrypt:\n"
    )


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def encrypted_elements(stored: dict) -> int:
    """Elements the server holds only as ciphertext: each left a mark where it was (the mask marker, a
    masked ``dataAbsentReason`` or the neutral narrative) and sits in a ciphertext (its group's, or its own)."""
    return sum(
        1
        for d in _walk(stored)
        if mk.has_mask_marker(d) or mk.is_masked_concept(d.get("dataAbsentReason")) or d.get("div") == mk.NEUTRAL_DIV
    )


def search_tokens(stored: dict) -> int:
    """Blind-index identifiers: keyed tokens that let the server answer exact searches."""
    return sum(1 for d in _walk(stored) if str(d.get("system", "")).startswith(INDEX_BASES))


def leaks(
    written: list[Written], needles: Mapping[str, list[str]], dump: list[dict], directory: set[str]
) -> dict[str, list[str]]:
    """Per sample file, its plaintext PHI values found anywhere in what the server stores (every version),
    except in the hospital's ``directory`` resources: they hold the hospital's and doctors' own names, which
    the samples' reference displays repeat (and the policy encrypts there, next to the patient)."""
    blob = json.dumps([r for r in dump if f"{r['resourceType']}/{r['id']}" not in directory], ensure_ascii=False)
    return {w.source: [n for n in needles.get(w.source, []) if n in blob] for w in written if w.source}


def summary(written: list[Written], needles: Mapping[str, list[str]], found: Mapping[str, list[str]]) -> str:
    """One row per resource, a total, and the at-rest scan's verdict."""
    counts = [
        (
            encrypted_elements(w.stored),
            search_tokens(w.stored),
            len(needles.get(w.source, [])) if w.source else None,
            len(found.get(w.source, [])) if w.source else None,
        )
        for w in written
    ]
    total = tuple(sum(c[i] or 0 for c in counts) for i in range(4))
    names = [w.reference[: w.reference.index("/") + 9] + "…" for w in written]
    table = [("resource", "encrypted elements", "search tokens", "PHI values sent", "found at server")]
    table += [
        (name, *("-" if n is None else str(n) for n in c))
        for name, c in zip([*names, "total"], [*counts, total], strict=True)
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in table
    ]
    rule = "  " + "  ".join("─" * w for w in widths)
    lines = [lines[0], rule, *lines[1:-1], rule, lines[-1]]
    named = "; ".join(f"{source}: {', '.join(v)}" for source, v in found.items() if v)
    scan = (
        f"At-rest scan of everything the FHIR server stores, every version (but for the hospital's directory: "
        f"Organization, Practitioner, Location): {total[3]} of {total[2]} plaintext PHI values found"
        f"{': ' + named if named else ''}."
    )
    return "\n".join(lines) + "\n\n" + scan + "\n"


def _shorten(value: object, limit: int) -> object:
    """Ciphertexts are long; show their start so the columns stay readable."""
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def side_by_side(left: dict, right: dict, width: int) -> str:
    col = max(30, (width - 3) // 2)
    a = json.dumps(_shorten(left, col - 20), indent=1, ensure_ascii=False).splitlines()
    b = json.dumps(_shorten(right, col - 20), indent=1, ensure_ascii=False).splitlines()
    rows = [f"{'APPLICATION SEES (through fhircrypt)':<{col}} │ FHIR SERVER STORES", f"{'─' * col}─┼─{'─' * col}"]
    for i in range(max(len(a), len(b))):
        la = a[i] if i < len(a) else ""
        lb = b[i] if i < len(b) else ""
        rows.append(f"{la[:col]:<{col}} │ {lb[:col]}")
    return "\n".join(rows)


def sides(written: list[Written], width: int) -> str:
    return "\n\n".join(f"═══ {w.reference} ═══\n{side_by_side(w.seen, w.stored, width)}" for w in written)


def excerpt(written: list[Written], width: int) -> str:
    """The Patient's first identifiers, name and birth date, as the application and the server see them."""
    patient = next(w for w in written if w.reference.startswith("Patient/"))

    def pick(resource: dict) -> dict:
        out = {k: resource[k] for name in EXCERPT for k in (name, f"_{name}") if k in resource}
        out["identifier"] = out.get("identifier", [])[:1]
        return out

    return (
        f"Excerpt of {patient.reference} ({', '.join(EXCERPT)}; `./dev demo --full` shows every resource):\n"
        + side_by_side(pick(patient.seen), pick(patient.stored), width)
    )


def try_it(proxy: str, upstream: str, patient: str, nik: str) -> str:
    return (
        "\nProxy and server keep running (Ctrl-C stops them). Try:\n"
        f"  curl -s {proxy}/{patient}                # plaintext, through fhircrypt\n"
        f"  curl -s {upstream}/{patient}          # ciphertext, as the server stores it\n"
        f"  curl -s '{proxy}/Patient?identifier=https://fhir.kemkes.go.id/id/nik|{nik}'   # search by NIK\n"
    )
