"""Smoke test of the benchmark (bench/): it runs and reports every target and workload.

Never checks how fast anything is: the benchmark is not a timed test. The quick mode uses
the Python load generator (no wrk) and needs no matplotlib, so it needs nothing beyond the
test dependencies and the test upstream. The run against HAPI (``--upstream hapi``) is marked
``hapi``: it runs with ``./dev test --upstream hapi``, not in the default loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "passthrough", "fhircrypt-empty", "fhircrypt-satusehat")
PROXIES = ("passthrough", "fhircrypt-empty", "fhircrypt-satusehat")
WORKLOADS = ("read", "search", "create", "transaction", "export")
HEAVY = ("transaction", "export")  # measured at one connection only


def _quick_run(tmp_path: Path, *extra: str) -> dict:
    """``python -m bench --quick`` with the Python load generator; the results it wrote."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--loadgen", "python", "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    name = extra[extra.index("--name") + 1] if "--name" in extra else "latest"
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.md").read_text().startswith("Run ")
    assert data["quick"] is True
    assert data["method"]["closed_loop_tool"] == "python"
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu_model"]
    return data


def _check_every_cell(data: dict) -> None:
    """Every target served every workload at its concurrencies without errors, and each seed's check held."""
    for workload in WORKLOADS:
        assert set(data["results"][workload]) == ({"1"} if workload in HEAVY else {"1", "8"}), workload
        for c in data["results"][workload]:
            cells = data["results"][workload][c]
            assert set(cells) == set(TARGETS)
            for target in TARGETS:
                cell = cells[target]
                where = f"{workload} c={c} {target}"
                assert cell["errors"] == 0, where  # every answer 2xx: the proxy served, not refused
                assert cell["throughput"] > 0, where
                assert cell["open_achieved_rate"] > 0, where
                assert cell["latency_ms"]["p50"] is not None, where
                assert cell["latency_ms"]["p99"] is not None, where
                assert cell["upstream_cpu_us_per_req"] > 0, where  # the upstream's process is the one measured
                assert "throughput_x_direct" in cell["ratios"], where
                if target in PROXIES:
                    assert cell["proxy_cpu_us_per_req"] is not None, where
                else:
                    assert cell["proxy_cpu_us_per_req"] is None, where

    # the search workload really returns 100 Patients through every target, the transaction creates 50,
    # the export's files hold every Patient (each seed checked that the plaintext NIK came back)
    for cells in data["raw_rounds"]:
        for cell in cells:
            if cell["workload"] in ("search", "transaction"):
                assert cell["closed"]["check"]["entries"] == (100 if cell["workload"] == "search" else 50)
            if cell["workload"] == "export":
                check = cell["closed"]["check"]
                assert check["lines_all_files"] == 100 and 1 <= check["lines"] <= 100 and check["files"] >= 1


def test_quick_benchmark_reports_every_target_workload_and_concurrency(tmp_path):
    data = _quick_run(tmp_path)
    assert data["upstream"]["name"] == "medplum"
    _check_every_cell(data)

    # 1 and 2 worker processes of the real `fhircrypt serve`, both serving without errors
    scaling = data["scaling"]["results"]
    for workload in ("read", "search"):
        assert set(scaling[workload]) == {"1", "2"}
        for cell in scaling[workload].values():
            assert cell["errors"] == 0 and cell["throughput"] > 0 and cell["proxy_cpu_us_per_req"] > 0

    # each fhircrypt target against its twin with the garbage collector at Python's defaults
    gc = data["gc"]["results"]
    assert set(gc) == {"fhircrypt-empty", "fhircrypt-satusehat"}
    for by_mode in gc.values():
        assert set(by_mode) == {"tuned", "default"}
        for cell in by_mode.values():
            assert cell["errors"] == 0 and cell["throughput"] > 0 and cell["latency_ms"]["p99"] is not None

    core = data["core"]["cases"]
    for case in ("orjson", "decrypt", "decrypt_path", "crypto_floor", "encrypt", "encrypt_path", "crypto_floor_write"):
        assert core[case]["per_core_per_s"] > 0
    assert data["core"]["encrypted_elements"] >= 8
    assert data["core"]["profile"]["decrypt_path"]["functions"]
    # process CPU is read from /proc in 10 ms clock ticks: in a quick run's 0.25 s phases a few transactions or
    # export files through the passthrough may use none, and a ratio to zero is reported as not measured;
    # the core, stored-form and latency targets are always measured
    assert {t["target"] for t in data["targets"]}
    assert all(t["measured"] is not None for t in data["targets"] if " CPU " not in t["target"])


@pytest.mark.hapi
def test_quick_benchmark_against_hapi_under_its_own_name(tmp_path):
    """``--upstream hapi``: the same workloads against HAPI FHIR's JPA server (its own Bulk export of
    Patients stored through each target), results under ``--name``; the comparisons that do not
    depend on the upstream (core, collector, workers) are left to the Medplum run."""
    data = _quick_run(tmp_path, "--upstream", "hapi", "--name", "hapi-smoke", "--no-core", "--no-gc", "--no-scaling")
    assert not list(tmp_path.glob("latest.*"))  # --name: the Medplum run's files are not overwritten
    assert data["upstream"]["name"] == "hapi" and "HAPI FHIR JPA server 8." in data["upstream"]["server"]
    assert "$expunge" in data["method"]["reset"]
    assert "HAPI FHIR JPA server" in (tmp_path / "hapi-smoke.md").read_text().splitlines()[0]
    _check_every_cell(data)


def test_quick_soak_samples_memory_and_counts_key_provider_calls(tmp_path):
    seconds, refresh = 30, 4
    cmd = [sys.executable, "-m", "bench.soak", "--seconds", str(seconds), "--slice", "3", "--interval", "1",
           "--refresh", str(refresh), "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    data = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.md").read_text().startswith("Soak ")
    assert data["errors"] == 0 and data["requests"] > 100
    assert {s["workload"] for s in data["slices"]} == set(WORKLOADS)
    assert len(data["samples"]) >= seconds // 2 and all(s["rss_bytes"] > 0 for s in data["samples"])
    assert data["rss_bytes"]["end"] > 0 and data["rss_growth_mb_per_min_after_warmup"] is not None

    # the keyring is unwrapped at start-up, then once per background refresh: the calls follow the
    # clock, not the hundreds of requests in between
    start, end = (data["key_provider_calls"][k].get("unwrap/ok", 0) for k in ("start", "end"))
    assert start >= 1 and end % start == 0
    refreshes = end / start - 1
    assert 1 <= refreshes <= seconds / refresh + 2
    assert data["proxy_requests_counted"]["end"] - data["proxy_requests_counted"]["start"] >= data["requests"]
