"""Human-readable explanation of a compiled policy, for ``fhircrypt policy check``."""

from __future__ import annotations

from proxy.policy.affects import affected_params
from proxy.policy.compiler import CompiledPolicy, Kind

_FORMS = {
    Kind.PRIMITIVE: "value removed; mask marker on the _element twin",
    Kind.COMPLEX: "element replaced by the mask marker",
    Kind.CHOICE: "typed slot kept (type visible); contents encrypted",
    Kind.CHOICE_MASKED: "value[x] removed; dataAbsentReason=masked",
    Kind.NARRATIVE: "neutral narrative; original encrypted",
}


_FORMATS = {
    "v2": "v2 (the elements of each group sealed in one ciphertext beside the envelope; v1 records still read)",
    "v1": "v1 (each element its own ciphertext, beside its mask marker)",
}


def explain(policy: CompiledPolicy, show_display: bool = False) -> str:
    lines = [
        f"policy '{policy.name}' ({policy.source}, sha256 {policy.digest[:16]})",
        f"groups: {', '.join(f'{g}' for g in policy.groups)}",
        f"resources without an envelope (written around the proxy): {policy.unenveloped}",
        "at-rest format written: " + _FORMATS[policy.at_rest_format],
        "data keys wrapped by: "
        + (
            "the patient's own key in a patient's compartment (crypto-shredding), else the master key"
            if policy.per_patient_keys
            else "the keyring's master key"
        ),
        "identifiers under systems the policy does not name: "
        + _closure(policy.closure.identifiers, policy.closure.identifier_group),
        "extensions the policy does not name: " + _closure(policy.closure.extensions, policy.closure.extension_group),
        "PHI sentinel on clear values: "
        + ", ".join(f"{d} {a}" for d, a in policy.sentinel.actions.items())
        + (f" (sealed in place, read by group {policy.sentinel.group})" if policy.sentinel.sealing else ""),
        "",
    ]
    display_only = []
    for rtype, rp in sorted(policy.resources.items()):
        explicit = [e for e in rp.content_elements if not e.display_copy and e.closing is None]
        displays = [e for e in rp.content_elements if e.display_copy]
        closing = [e for e in rp.content_elements if e.closing is not None]
        if not explicit:
            display_only.append(rtype)
            continue
        lines.append(f"{rtype}  (narrative: {rp.narrative_mode})")
        affected = affected_params(rp)
        for el in explicit:
            lines.append(f"  {el.source:<70} {','.join(sorted(el.groups)):<14} {_FORMS[el.kind]}")
            indexed = [i.param for i in el.indexes]
            refused = [c for c in affected.get(el.field_id, []) if c not in indexed]
            if indexed:
                lines.append(f"  {'':<70} {'':<14} searchable (blind index): {', '.join(indexed)}")
            if refused:
                lines.append(f"  {'':<70} {'':<14} refused searches: {', '.join(refused)}")
        if displays:
            names = ", ".join(e.field_id.removeprefix("display:") for e in displays) if show_display else len(displays)
            lines.append(f"  + Reference.display of: {names}")
        if closing:
            lines.append(
                f"  + closed defaults (unlisted identifier systems, extension URLs) at locations: {len(closing)}"
            )
    if display_only:
        on = policy.closure.identifiers != "allow" or policy.closure.extensions != "allow"
        closed_note = " (and the closed defaults)" if on else ""
        lines += [
            "",
            f"only Reference.display and narrative{closed_note} encrypted ({len(display_only)} types): "
            + ", ".join(display_only),
        ]
    if policy.findings:
        lines += ["", "findings:"] + [f"  - {f.severity} [{f.code}] {f.message}" for f in policy.findings]
    return "\n".join(lines)


def _closure(mode: str, group: str | None) -> str:
    if mode == "encrypt":
        return f"encrypt (group {group}, no blind index)"
    return {"refuse": "refuse the write (400)", "allow": "allow: stored in the clear"}[mode]
