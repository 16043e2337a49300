"""The coverage report as JSON, as a terminal table and as one self-contained HTML page.

The JSON document is the source of the other two. The HTML page has no external asset (no script,
font, stylesheet or image link): inline CSS and, per resource type, an inline SVG bar chart with one
stacked bar per element path, so it can be mailed or archived as it is.
"""

from __future__ import annotations

from html import escape
from typing import Any

from proxy.coverage.scan import Coverage

FORMAT = "fhircrypt-coverage/1"
# the segments of a bar, in order: what is protected, then what is not
SEGMENTS = (
    ("encrypted", "encrypted", "#2e7d32"),
    ("masked", "masked", "#9e9e9e"),
    ("clear_covered", "clear, covered by the policy", "#f9a825"),
    ("clear_uncovered", "clear, not covered by the policy", "#c62828"),
    ("clear_unknown", "clear (no policy given)", "#ef6c00"),
)


def build(cov: Coverage, meta: dict) -> dict:
    """The report document: ``meta`` (source, policy, completeness) and the counts by type and path."""
    types = {}
    for rtype in sorted(cov.rows):
        rows: list[dict[str, Any]] = []
        for path, c in sorted(cov.rows[rtype].items()):
            examples = cov.examples.get(rtype, {}).get(path, {})
            rows.append(
                {
                    "path": path,
                    "encrypted": c["encrypted"],
                    "masked": c["masked"],
                    "clear": c["clear"],
                    "clear_covered": c["clear.covered"] if meta.get("policy") else None,
                    "clear_uncovered": c["clear.uncovered"] if meta.get("policy") else None,
                    "phi": c["phi"],
                    "phi_by_detector": {k[4:]: n for k, n in sorted(c.items()) if k.startswith("phi.")},
                    "examples": examples.get("any", []),
                    "phi_examples": examples.get("phi", []),
                }
            )
        totals = {k: sum(r[k] or 0 for r in rows) for k in ("encrypted", "masked", "clear", "phi")}
        if meta.get("policy"):
            totals |= {k: sum(r[k] for r in rows) for k in ("clear_covered", "clear_uncovered")}
        types[rtype] = {"resources": cov.resources[rtype], "totals": totals, "paths": rows}
    return {"format": FORMAT, **meta, "types": types}


def _segments(row: dict) -> list[tuple[str, str, str, int]]:
    """(key, label, colour, count) of a row's (or a type's totals') bar."""
    counts = dict(row)
    if counts.get("clear_covered") is None:
        counts["clear_unknown"] = counts["clear"]
    return [(k, label, colour, counts.get(k) or 0) for k, label, colour in SEGMENTS if counts.get(k)]


def table(doc: dict) -> str:
    """The terminal table: one block per type, one line per path (paths, counts and example locations)."""
    policy = bool(doc.get("policy"))
    head = ["path", "encrypted", "masked", "clear"] + (["not covered"] if policy else []) + ["PHI-like", "example"]
    lines = [_title(doc)]
    for rtype, t in doc["types"].items():
        rows = [head]
        for r in t["paths"]:
            cells = [r["path"], r["encrypted"], r["masked"], r["clear"]]
            cells += [r["clear_uncovered"]] if policy else []
            shown = (r["phi_examples"] or r["examples"] or [""])[0]
            cells += [_phi_cell(r), shown.split(" ", 1)[-1]]
            rows.append([str(c) for c in cells])
        widths = [min(max(len(r[i]) for r in rows), 70) for i in range(len(head))]
        lines.append(f"\n{rtype}: {t['resources']} resource(s)")
        for r in rows:
            lines.append("  " + "  ".join(_fit(c, w, i) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if not doc["types"]:
        lines.append("no resources found")
    return "\n".join(lines)


def _fit(cell: str, width: int, column: int) -> str:
    if len(cell) > width:  # keep both ends of a path: its type and its last element tell it apart
        head = (width - 1) // 2
        cell = cell[:head] + "…" + cell[len(cell) - (width - 1 - head) :]
    return cell.ljust(width) if column == 0 or not cell.isdigit() else cell.rjust(width)


def _phi_cell(row: dict) -> str:
    if not row["phi"]:
        return "0"
    return f"{row['phi']} (" + ", ".join(f"{k} {n}" for k, n in row["phi_by_detector"].items()) + ")"


def _title(doc: dict) -> str:
    policy = doc.get("policy")
    state = "complete" if doc.get("complete") else "INTERRUPTED (partial counts)"
    against = f"policy {policy['name']} ({policy['digest'][:12]})" if policy else "no policy"
    return f"fhircrypt coverage of {doc.get('source', '?')}: {state}; {against}; detectors: {doc.get('detectors')}"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 2em}th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}
td.path,th.path,td.ex{text-align:left;font-family:monospace}td.ex{color:#555;font-size:12px}
tr.phi td{background:#fdecea}.legend span{display:inline-block;margin-right:1em}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
svg text{font:11px monospace}
"""


def html(doc: dict) -> str:
    """The self-contained HTML page (every value escaped; no external references)."""
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{escape(label)}</span>'
        for key, label, colour in SEGMENTS
        if (key == "clear_unknown") != bool(doc.get("policy"))
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>fhircrypt coverage</title>',
        f"<style>{_CSS}</style></head><body>",
        f'<h1>fhircrypt coverage</h1><p id="summary">{escape(_title(doc))}</p>',
        f'<p class="legend">{legend}</p>',
    ]
    if doc["types"]:
        overview = [{"path": rtype, **t["totals"]} for rtype, t in doc["types"].items()]
        parts.append(f'<h2>All types</h2><div class="overview">{_chart("all types", overview)}</div>')
    for rtype, t in doc["types"].items():
        parts.append(f'<section class="type" id="type-{escape(rtype)}" data-type="{escape(rtype)}">')
        parts.append(f"<h2>{escape(rtype)}</h2><p>{t['resources']} resource(s)</p>")
        parts.append(_chart(rtype, t["paths"]))
        parts.append(_html_table(t, bool(doc.get("policy"))))
        parts.append("</section>")
    if not doc["types"]:
        parts.append("<p>no resources found</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _chart(name: str, rows: list[dict]) -> str:
    """One stacked horizontal bar per row (an element path, or a type's totals), scaled to the largest row."""
    label_w, bar_w, row_h = 420, 360, 16
    biggest = max((r["encrypted"] + r["masked"] + r["clear"] for r in rows), default=1) or 1
    height = row_h * len(rows) + 4
    out = [
        f'<svg class="chart" data-type="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{label_w + bar_w + 100}" height="{height}" role="img" aria-label="{escape(name)}">'
    ]
    for i, r in enumerate(rows):
        y = i * row_h + 2
        out.append(f'<text x="0" y="{y + 11}">{escape(_short(r["path"], 58))}</text>')
        x = float(label_w)
        for key, label, colour, n in _segments(r):
            w = bar_w * n / biggest
            out.append(
                f'<rect class="bar {key}" x="{x:.1f}" y="{y}" width="{max(w, 1):.1f}" height="{row_h - 3}" '
                f'fill="{colour}"><title>{escape(r["path"])}: {n} {escape(label)}</title></rect>'
            )
            x += w
        if r["phi"]:
            out.append(f'<text class="phi" x="{x + 4:.1f}" y="{y + 11}" fill="#c62828">PHI-like {r["phi"]}</text>')
    out.append("</svg>")
    return "".join(out)


def _short(path: str, n: int) -> str:
    return path if len(path) <= n else path[: n // 2] + "…" + path[len(path) - (n - 1 - n // 2) :]


def _html_table(t: dict, policy: bool) -> str:
    head = ["encrypted", "masked", "clear"] + (["clear, covered", "clear, not covered"] if policy else [])
    out = ['<table class="paths"><thead><tr><th class="path">element path</th>']
    out += [f"<th>{h}</th>" for h in head] + ["<th>PHI-like</th><th>example locations</th></tr></thead><tbody>"]
    keys = ["encrypted", "masked", "clear"] + (["clear_covered", "clear_uncovered"] if policy else [])
    for r in t["paths"]:
        out.append(f'<tr class="{"phi" if r["phi"] else ""}"><td class="path">{escape(r["path"])}</td>')
        out += [f"<td>{r[k]}</td>" for k in keys]
        examples = r["phi_examples"] or r["examples"]
        out.append(f'<td>{escape(_phi_cell(r))}</td><td class="ex">{"<br>".join(map(escape, examples))}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)
