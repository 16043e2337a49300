"""Medians, ratios and the issue's targets; JSON, a PNG chart and Markdown tables.

``summarise`` turns the raw rounds into ``results[workload][c][target]``: medians over
the rounds of every metric, and the ratios/deltas to ``direct`` and ``passthrough`` as
medians of per-round paired values (each round measures all targets back to back).

Re-render from a saved run: ``python -m bench.report bench/results/latest.json`` (the files keep its name).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

TIMES, DASH = "\u00d7", "\u2013"  # the multiplication sign and the en dash of the tables
LABELS = {
    "direct": "direct",
    "passthrough": "bare passthrough",
    "fhircrypt-empty": "fhircrypt, empty policy",
    "fhircrypt-satusehat": "fhircrypt, satusehat",
}
COLORS = {
    "direct": "#4c72b0",
    "passthrough": "#8c8c8c",
    "fhircrypt-empty": "#55a868",
    "fhircrypt-satusehat": "#c44e52",
}


def _median(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _delta(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _paired_ratios(runs: list[list[dict]], rounds: int) -> dict[str, float | None]:
    """Medians over rounds of this target's ratios and deltas to direct and to the passthrough."""
    mine, direct, bare = runs
    values: dict[str, list] = {}
    for i in range(min(rounds, len(mine))):
        me = mine[i]
        d = direct[i] if i < len(direct) else None
        b = bare[i] if i < len(bare) else None

        def closed(cell: dict | None, key: str):
            return cell["closed"][key] if cell else None

        def opened(cell: dict | None, p: str):
            return cell["open"]["latency_ms"][p] if cell else None

        pairs = {
            "throughput_x_direct": _ratio(closed(me, "throughput"), closed(d, "throughput")),
            "throughput_x_passthrough": _ratio(closed(me, "throughput"), closed(b, "throughput")),
            "p50_delta_ms_vs_direct": _delta(opened(me, "p50"), opened(d, "p50")),
            "p99_delta_ms_vs_direct": _delta(opened(me, "p99"), opened(d, "p99")),
            "p50_x_direct": _ratio(opened(me, "p50"), opened(d, "p50")),
            "p50_delta_ms_vs_passthrough": _delta(opened(me, "p50"), opened(b, "p50")),
            "proxy_cpu_x_passthrough": _ratio(closed(me, "proxy_cpu_us_per_req"), closed(b, "proxy_cpu_us_per_req")),
        }
        for k, v in pairs.items():
            values.setdefault(k, []).append(v)
    return {k: _median(v) for k, v in values.items()}


def summarise(result: dict) -> dict:
    """Adds ``results`` (medians, ratios) and ``targets`` (the issue's goals) to a raw run."""
    rounds = result["raw_rounds"]
    cells: dict[tuple[str, int, str], list[dict]] = {}
    for cells_of_round in rounds:
        for cell in cells_of_round:
            cells.setdefault((cell["workload"], cell["c"], cell["target"]), []).append(cell)
    workloads = list(dict.fromkeys(k[0] for k in cells))
    targets = list(dict.fromkeys(k[2] for k in cells))
    results: dict = {}
    for w in workloads:
        for c in sorted({k[1] for k in cells if k[0] == w}):  # the heavy workloads run at c=1 only
            per_target = {}
            for t in targets:
                runs = cells.get((w, c, t), [])
                closed = [r["closed"] for r in runs]
                opened = [r["open"] for r in runs]
                per_target[t] = {
                    "throughput": _median(r["throughput"] for r in closed),
                    "latency_ms": {
                        p: _median(r["latency_ms"][p] for r in opened) for p in ("p50", "p95", "p99", "max")
                    },
                    "closed_latency_ms": {
                        p: _median(r["latency_ms"][p] for r in closed) for p in ("p50", "p95", "p99")
                    },
                    "open_offered_rate": _median(r["offered_rate"] for r in opened),
                    "open_achieved_rate": _median(r["throughput"] for r in opened),
                    "proxy_cpu_us_per_req": _median(r["proxy_cpu_us_per_req"] for r in closed),
                    "proxy_cpu_us_per_req_open": _median(r["proxy_cpu_us_per_req"] for r in opened),
                    "upstream_cpu_us_per_req": _median(r["upstream_cpu_us_per_req"] for r in closed),
                    "proxy_cores": _median(r["proxy_cores"] for r in closed),
                    "upstream_cores": _median(r["upstream_cores"] for r in closed),
                    "loadgen_cores": _median(r["loadgen_cores"] for r in closed),
                    "requests": sum(r["requests"] for r in closed) + sum(r["requests"] for r in opened),
                    "errors": sum(r["errors"] for r in closed) + sum(r["errors"] for r in opened),
                    "response_bytes": runs[0]["closed"]["check"].get("bytes") if runs else None,
                    "rounds": len(runs),
                }
            # paired ratios: within each round, against the same round's direct and passthrough
            for t in targets:
                per_target[t]["ratios"] = _paired_ratios(
                    [cells.get((w, c, x), []) for x in (t, "direct", "passthrough")], len(rounds)
                )
            results.setdefault(w, {})[str(c)] = per_target
    result["results"] = results
    if result.get("scaling"):
        result["scaling"]["results"] = summarise_scaling(result["scaling"]["raw"])
    if result.get("gc"):
        result["gc"]["results"] = summarise_gc(result["gc"]["raw"])
    result["targets"] = evaluate_targets(result)
    return result


def summarise_scaling(rows: list[dict]) -> dict:
    """``{workload: {workers: medians}}`` and the throughput of N workers over 1, paired per round."""
    out: dict = {}
    for w in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == w]
        by_workers: dict = {}
        for n in sorted({r["workers"] for r in mine}):
            runs = [r for r in mine if r["workers"] == n]
            one = {r["round"]: r["throughput"] for r in mine if r["workers"] == 1}
            by_workers[str(n)] = {
                "throughput": _median(r["throughput"] for r in runs),
                "proxy_cores": _median(r["proxy_cores"] for r in runs),
                "proxy_cpu_us_per_req": _median(r["proxy_cpu_us_per_req"] for r in runs),
                "upstream_cores": _median(r["upstream_cores"] for r in runs),
                "loadgen_cores": _median(r["loadgen_cores"] for r in runs),
                "throughput_x_1_worker": _median(_ratio(r["throughput"], one.get(r["round"])) for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "rounds": len(runs),
            }
        out[w] = by_workers
    return out


def summarise_gc(rows: list[dict]) -> dict:
    """``{policy target: {"tuned"|"default": medians}}`` of the garbage-collector comparison."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["policy"], {}).setdefault(row["gc"], []).append(row)
    return {
        policy: {
            mode: {
                "throughput": _median(r["closed"]["throughput"] for r in runs),
                "proxy_cpu_us_per_req": _median(r["closed"]["proxy_cpu_us_per_req"] for r in runs),
                "latency_ms": {
                    p: _median(r["open"]["latency_ms"][p] for r in runs) for p in ("p50", "p95", "p99", "max")
                },
                "open_offered_rate": _median(r["open"]["offered_rate"] for r in runs),
                "errors": sum(r["closed"]["errors"] + r["open"]["errors"] for r in runs),
                "rounds": len(runs),
            }
            for mode, runs in by_mode.items()
        }
        for policy, by_mode in out.items()
    }


def _target(name: str, measured: float | None, limit: float, unit: str, higher_is_better: bool) -> dict:
    if measured is None:
        return {"target": name, "measured": None, "limit": limit, "unit": unit, "met": None, "miss_by": None}
    met = measured >= limit if higher_is_better else measured <= limit
    miss = None if met else (limit - measured if higher_is_better else measured - limit)
    return {"target": name, "measured": measured, "limit": limit, "unit": unit, "met": met, "miss_by": miss}


def evaluate_targets(result: dict) -> list[dict]:
    """Issue 16's targets (ratios within this run; absolute times vary between machines)."""
    out = []
    core = result.get("core") or {}
    cases = core.get("cases")
    if cases:
        plain, stored = core.get("bytes_plaintext"), core.get("bytes_at_rest")
        out += [
            _target("core decrypt path, SATUSEHAT Patient, x orjson parse+serialise",
                    cases["decrypt_path"]["x_orjson"], 5, "x", False),
            _target("core encrypt path, SATUSEHAT Patient, x orjson parse+serialise",
                    cases["encrypt_path"]["x_orjson"], 8, "x", False),
            _target("stored SATUSEHAT Patient, x its plaintext bytes",
                    stored / plain if plain and stored else None, 2.0, "x", False),
            _target("stored SATUSEHAT Patient, extra (index) identifiers",
                    core.get("index_identifiers"), 12, "", False),
            _target("core PHI sentinel per write within 0.35x of the encrypt path",
                    (cases.get("sentinel") or {}).get("x_encrypt_path"), 0.35, "x", False),
        ]  # fmt: skip
    res = result.get("results", {})

    def cell(w: str, target: str) -> dict | None:
        return res.get(w, {}).get("1", {}).get(target)

    def cpu_x(w: str, target: str) -> float | None:
        c = cell(w, target)
        return c["ratios"]["proxy_cpu_x_passthrough"] if c else None

    def p50(w: str) -> float | None:
        c = cell(w, "fhircrypt-satusehat")
        return c["ratios"]["p50_delta_ms_vs_direct"] if c else None

    def upstream_x(w: str) -> float | None:
        mine, direct = cell(w, "fhircrypt-satusehat"), cell(w, "direct")
        if not mine or not direct or not direct.get("upstream_cpu_us_per_req"):
            return None
        return mine["upstream_cpu_us_per_req"] / direct["upstream_cpu_us_per_req"]

    for w in ("create", "search"):
        out.append(
            _target(f"upstream CPU per {w} through the proxy (SATUSEHAT) x direct", upstream_x(w), 1.5, "x", False)
        )
    for w, limit in (("read", 1.2), ("search", 1.2), ("create", 1.2), ("export", 1.2), ("transaction", 2.0)):
        out.append(
            _target(
                f"empty policy {w} c=1: proxy CPU x bare passthrough", cpu_x(w, "fhircrypt-empty"), limit, "x", False
            )
        )
    for w, limit in (("read", 1.5), ("create", 4.0), ("search", 10.0), ("export", 10.0), ("transaction", 10.0)):
        out.append(
            _target(
                f"SATUSEHAT {w} c=1: proxy CPU x bare passthrough", cpu_x(w, "fhircrypt-satusehat"), limit, "x", False
            )
        )
    for w, limit in (("read", 0.6), ("search", 4.0), ("create", 1.5)):
        out.append(_target(f"SATUSEHAT {w} c=1: p50 over direct", p50(w), limit, "ms", False))
    return out


# ------------------------------------------------------------------ output


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_all(result: dict, out: Path, chart: bool = True, name: str = "latest") -> list[Path]:
    """``out/<name>.json``, ``.md`` and (with matplotlib) ``.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n")
    paths[1].write_text(markdown(result))
    if chart:
        if have_matplotlib():
            paths.append(render_chart(result, out / f"{name}.png"))
        else:
            print("bench: matplotlib is not installed, no chart (pip install matplotlib)", file=sys.stderr)
    return paths


def _clean(value):
    """NaN (a phase without samples) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _fmt(v: float | None, digits: int = 2, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if abs(v) >= 100 and digits <= 2:
        return f"{v:,.0f}{suffix}"
    return f"{v:,.{digits}f}{suffix}"


def _signed(v: float | None) -> str:
    return DASH if v is None else f"{v:+.2f}"


def _targets(result: dict) -> list[str]:
    return list(next(iter(next(iter(result["results"].values())).values())))


def _upstream(result: dict) -> str:
    """The upstream's description; a run from before ``--upstream`` was against Medplum."""
    return (result.get("upstream") or {}).get("server", "Medplum FHIR router (tests/upstream)") + " upstream"


def markdown(result: dict) -> str:
    m = result["machine"]
    meth = result.get("method", {})
    lines = [
        f"Run {result['date']}, `{result['command']}`, {result.get('elapsed_s', 0):.0f} s; {_upstream(result)}; "
        f"{m['cores']} cores ({m['cpu_model']}), shared by load generator, upstream and proxies. "
        f"Closed loop: {meth.get('closed_loop_tool')}; open loop: Python paced client; "
        f"{meth.get('rounds')} round(s) of {meth.get('phase_seconds')} s phases, medians.",
        "",
    ]
    for w, by_c in result["results"].items():
        lines += [
            f"**{w}**",
            "",
            f"| c | target | req/s | {TIMES} direct | {TIMES} passthrough | p50 ms | p95 ms | p99 ms | "
            f"Δp50 vs direct | Δp99 vs direct | proxy CPU µs/req | CPU {TIMES} passthrough | errors |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c, per_target in by_c.items():
            for t, r in per_target.items():
                ra, lat = r["ratios"], r["latency_ms"]
                lines.append(
                    f"| {c} | {LABELS.get(t, t)} | {_fmt(r['throughput'], 0)} | "
                    f"{_fmt(ra.get('throughput_x_direct'))} | {_fmt(ra.get('throughput_x_passthrough'))} | "
                    f"{_fmt(lat['p50'])} | {_fmt(lat['p95'])} | "
                    f"{_fmt(lat['p99'])} | {_signed(ra.get('p50_delta_ms_vs_direct'))} | "
                    f"{_signed(ra.get('p99_delta_ms_vs_direct'))} | {_fmt(r['proxy_cpu_us_per_req'], 0)} | "
                    f"{_fmt(ra.get('proxy_cpu_x_passthrough'))} | {r['errors']} |"
                )
        lines.append("")
    lines += [
        "**closed-loop latency** (wrk at saturation; coordinated omission not corrected, for comparison only)",
        "",
        "| workload | c | " + " | ".join(f"{LABELS.get(t, t)} p50 / p99 ms" for t in _targets(result)) + " |",
        "|---|---|" + "--:|" * len(_targets(result)),
    ]
    for w, by_c in result["results"].items():
        for c, per_target in by_c.items():
            cols = [
                f"{_fmt(r['closed_latency_ms']['p50'])} / {_fmt(r['closed_latency_ms']['p99'])}"
                for r in per_target.values()
            ]
            lines.append(f"| {w} | {c} | " + " | ".join(cols) + " |")
    lines.append("")
    scaling = (result.get("scaling") or {}).get("results")
    if scaling:
        sc = result["scaling"]
        lines += [
            f"**scaling** (`{sc['command']}`, closed loop, {sc['connections']} connections, {sc['closed_loop_tool']})",
            "",
            f"| workload | workers | req/s | {TIMES} 1 worker | proxy cores | proxy CPU µs/req | upstream cores | "
            "load generator cores | errors |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for w, by_n in scaling.items():
            for n, r in by_n.items():
                lines.append(
                    f"| {w} | {n} | {_fmt(r['throughput'], 0)} | {_fmt(r['throughput_x_1_worker'])} | "
                    f"{_fmt(r['proxy_cores'])} | {_fmt(r['proxy_cpu_us_per_req'], 0)} | {_fmt(r['upstream_cores'])} | "
                    f"{_fmt(r['loadgen_cores'])} | {r['errors']} |"
                )
        lines.append("")
    gc = (result.get("gc") or {}).get("results")
    if gc:
        lines += [
            f"**garbage collector** ({result['gc']['workload']} at c={result['gc']['c']}; tuned: "
            f"{result['gc']['tuned']}; default: {result['gc']['default']})",
            "",
            "| target | collector | req/s | proxy CPU µs/req | open-loop p50 ms | p95 ms | p99 ms | max ms | errors |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for policy, by_mode in gc.items():
            for mode in ("tuned", "default"):
                r = by_mode.get(mode)
                if r:
                    lat = r["latency_ms"]
                    lines.append(
                        f"| {policy} | {mode} | {_fmt(r['throughput'], 0)} | {_fmt(r['proxy_cpu_us_per_req'], 0)} | "
                        f"{_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} | "
                        f"{r['errors']} |"
                    )
        lines.append("")
    core = result.get("core")
    if core:
        lines += [
            f"**core** (one thread, CPU time; {core['bytes_plaintext']} B Patient, {core['bytes_at_rest']} B at rest, "
            f"{core['encrypted_elements']} encrypted elements)",
            "",
            f"| case | µs/Patient | Patients/s per core | {TIMES} orjson baseline |",
            "|---|--:|--:|--:|",
        ]
        for name, r in core["cases"].items():
            lines.append(f"| {name} | {r['cpu_us_per_op']:.1f} | {r['per_core_per_s']:,.0f} | {r['x_orjson']:.1f} |")
        lines.append("")
    lines += _profile_tables(result)
    lines += ["**targets**", "", "| target | measured | limit | met | missed by |", "|---|--:|--:|---|--:|"]
    for t in result.get("targets", []):
        met = DASH if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(
            f"| {t['target']} | {_fmt(t['measured'])} {t['unit']} | {_fmt(t['limit'])} {t['unit']} | {met} | "
            f"{_fmt(t['miss_by'])} {t['unit'] if t['miss_by'] is not None else ''} |"
        )
    lines.append("")
    return "\n".join(lines)


def _profile_tables(result: dict) -> list[str]:
    """Per workload, each profiled target's own CPU time per request by area: the passthrough's column is
    the HTTP floor every proxy of this design pays, the empty policy's the shell's cost on top of it."""
    workloads = (result.get("proxy_profile") or {}).get("workloads") or {}
    if not workloads or not all(type(t) is dict and "areas" not in t for t in workloads.values()):
        return []  # none, or a run from before every target was profiled
    lines = [
        "**where the CPU goes** (cProfile at c=1, own time per request by area in µs, idle time left out; "
        "cProfile inflates Python calls, so the totals exceed the measured CPU)",
        "",
    ]
    for workload, by_target in workloads.items():
        targets = list(by_target)
        spent = [{a["area"]: a["own_us_per_op"] for a in by_target[t]["areas"]} for t in targets]
        areas = sorted({a for s in spent for a in s}, key=lambda a: -max(s.get(a, 0.0) for s in spent))
        lines += [
            f"| {workload} | " + " | ".join(LABELS.get(t, t) for t in targets) + " |",
            "|---|" + "--:|" * len(targets),
            *(f"| {a} | " + " | ".join(_fmt(s.get(a), 0) for s in spent) + " |" for a in areas),
            "| **total** | " + " | ".join(_fmt(by_target[t]["total_us_per_op"], 0) for t in targets) + " |",
            "",
        ]
    return lines


def render_chart(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    workloads = list(res)
    targets = list(next(iter(next(iter(res.values())).values())))
    core = result.get("core")
    rows = 4 if core else 3
    fig = plt.figure(figsize=(5.2 * len(workloads), 3.6 * rows + 1.0), dpi=100)
    grid = fig.add_gridspec(rows, len(workloads), hspace=0.55, wspace=0.28)
    width = 0.8 / len(targets)

    def bars(ax, values_by_target, ylabel, title, annotate, conc):
        xs = range(len(conc))
        for i, t in enumerate(targets):
            vals = [values_by_target[t][j] for j in range(len(conc))]
            pos = [x - 0.4 + width * (i + 0.5) for x in xs]
            ax.bar(pos, [v or 0 for v in vals], width, color=COLORS.get(t), label=LABELS.get(t, t))
            for p, v, note in zip(pos, vals, annotate(t), strict=True):
                if note:
                    ax.annotate(note, (p, v or 0), ha="center", va="bottom", fontsize=7, rotation=90,
                                xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(list(xs), [f"c={c}" for c in conc])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.3)
        ax.grid(axis="y", alpha=0.3)

    for col, w in enumerate(workloads):
        cells = res[w]
        conc = list(cells)  # the heavy workloads run at c=1 only
        ax = fig.add_subplot(grid[0, col])
        bars(
            ax,
            {t: [cells[c][t]["throughput"] for c in conc] for t in targets},
            "requests/s (closed loop)",
            f"{w}: throughput",
            lambda t, cells=cells, conc=conc: [
                f"{_fmt(cells[c][t]['ratios'].get('throughput_x_direct'))}{TIMES}" for c in conc
            ],
            conc,
        )
        ax = fig.add_subplot(grid[1, col])
        bars(
            ax,
            {t: [cells[c][t]["latency_ms"]["p50"] for c in conc] for t in targets},
            "p50 latency ms (open loop)",
            f"{w}: p50 latency (tick = p99)",
            lambda t, cells=cells, conc=conc: [
                f"{_signed(cells[c][t]['ratios'].get('p50_delta_ms_vs_direct'))}" if t != "direct" else "" for c in conc
            ],
            conc,
        )
        for i, t in enumerate(targets):  # p99 as a tick above each bar
            for j, c in enumerate(conc):
                p99 = cells[c][t]["latency_ms"]["p99"]
                if p99 is not None:
                    x = j - 0.4 + width * (i + 0.5)
                    ax.plot([x - width / 2.5, x + width / 2.5], [p99, p99], color="black", lw=1.2)
        ax = fig.add_subplot(grid[2, col])
        bars(
            ax,
            {t: [cells[c][t]["proxy_cpu_us_per_req"] for c in conc] for t in targets},
            "proxy CPU µs/request",
            f"{w}: proxy CPU per request",
            lambda t, cells=cells, conc=conc: [
                f"{_fmt(cells[c][t]['ratios'].get('proxy_cpu_x_passthrough'))}{TIMES}" if t not in ("direct",) else ""
                for c in conc
            ],
            conc,
        )
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(targets), fontsize=10,
               frameon=False)  # fmt: skip
    if core:
        ax = fig.add_subplot(grid[3, :])
        names = list(core["cases"])
        rates = [core["cases"][n]["per_core_per_s"] for n in names]
        colors = ["#4c72b0" if n.startswith("orjson") else "#c44e52" if "crypt" in n else "#8c8c8c" for n in names]
        ax.barh(names, rates, color=colors)
        ax.set_xscale("log")
        for y, (n, r) in enumerate(zip(names, rates, strict=True)):
            ax.annotate(f"{r:,.0f}/s  ({core['cases'][n]['x_orjson']:.1f}{TIMES} orjson time)", (r, y), va="center",
                        fontsize=8, xytext=(3, 0), textcoords="offset points")  # fmt: skip
        base = core["cases"]["orjson"]["per_core_per_s"]  # issue 16: decrypt path 5x, encrypt path 8x orjson
        for goal, label in ((base / 5, "decrypt target (5x orjson)"), (base / 8, "encrypt target (8x orjson)")):
            ax.axvline(goal, color="black", ls="--", lw=0.8)
            ax.text(goal, 1.01, label, transform=ax.get_xaxis_transform(), fontsize=8, ha="center", va="bottom")
        ax.invert_yaxis()
        ax.set_xlabel("Patients/s per core (log scale)")
        ax.set_title("core micro-benchmark: SATUSEHAT Patient, no network, one core", fontsize=10, pad=16)
        ax.set_xlim(right=max(rates) * 6)
    m, meth = result["machine"], result.get("method", {})
    fig.suptitle(
        f"fhircrypt benchmark {result['date'][:10]} — {m['cores']} shared cores ({m['cpu_model']}), "
        f"{_upstream(result)}, closed loop {meth.get('closed_loop_tool')}, open loop Python at "
        f"{meth.get('load_fraction')}{TIMES} the slowest target's throughput, median of {meth.get('rounds')}",
        fontsize=11,
        y=0.995,
    )
    fig.subplots_adjust(top=0.93)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    data = summarise(data)
    saved = Path(sys.argv[1])
    for p in write_all(data, saved.parent, name=saved.stem):
        print(p)
