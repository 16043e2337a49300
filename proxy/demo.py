"""``fhircrypt demo``: the proxy in front of the embedded test upstream, side by side.

Starts the test FHIR server (Medplum's router, from tests/upstream), creates a
development keyring, runs the proxy with policies/satusehat.yaml, writes a sample
Indonesian patient, a lab Observation, a Condition and a MedicationRequest through
it, and prints what the application sees next to what the FHIR server stored.
Needs a source checkout (the test upstream is not part of the installed package).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.crypto.kek import generate_kek, load_local_kek
from proxy.crypto.keyring import Keyring, load_keyring, save_keyring
from proxy.policy.compiler import compile_file
from proxy.settings import Settings
from proxy.web.app import create_app
from proxy.web.runtime import RUNTIME

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ("patient.json", "observation-hemoglobin.json", "condition.json", "medication-request.json")
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _dev_keyring(workdir: Path) -> Keyring:
    kek_file, ring_file = workdir / "kek.txt", workdir / "keyring.json"
    workdir.mkdir(parents=True, exist_ok=True)
    if not kek_file.exists():
        kek_file.touch(mode=0o600)
        kek_file.write_text(generate_kek() + "\n")
    provider = load_local_kek(str(kek_file), environ={})
    if not ring_file.exists():
        save_keyring(ring_file, Keyring.generate(), provider)
    return load_keyring(ring_file, provider)


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


async def _demo(keyring: Keyring, keep_running: bool) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.upstream_server import UpstreamServer

    fixtures = ROOT / "tests" / "fixtures" / "satusehat"
    needles = json.loads((fixtures / "needles.json").read_text())
    upstream = UpstreamServer()
    await upstream.start_async()
    policy = compile_file(ROOT / "policies" / "satusehat.yaml")
    settings = Settings(
        upstream=upstream.base_url,
        policy="policies/satusehat.yaml",
        keyring="",
        auth="none",
        public_base="http://127.0.0.1:0/fhir/R4",
    )
    runner = web.AppRunner(create_app(settings, policy, keyring), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    proxy_base = f"http://127.0.0.1:{port}/fhir/R4"
    runner.app[RUNTIME].public_base = proxy_base  # the real port is known only now
    width = shutil.get_terminal_size((160, 40)).columns
    print(
        f"fhircrypt demo\n  upstream FHIR server (Medplum, in memory): {upstream.base_url}\n"
        f"  fhircrypt proxy: {proxy_base}   policy: policies/satusehat.yaml ({policy.name})\n"
        "  development mode (--auth none): every element is decrypted for every caller\n"
    )
    ids: dict[str, str] = {}
    written: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            for name in SAMPLES:
                text = (fixtures / name).read_text()
                for placeholder, value in ids.items():
                    text = text.replace(placeholder, value)
                resource = json.loads(text)
                rtype = resource["resourceType"]
                async with http.post(f"{proxy_base}/{rtype}", data=json.dumps(resource), headers=FHIR_JSON) as r:
                    created = await r.json()
                    if r.status != 201:
                        print(f"{rtype}: {r.status} {json.dumps(created)}")
                        return 1
                ids[f"{rtype.upper()}_ID"] = created["id"]
                written.extend(needles.get(name, []))
                async with http.get(f"{proxy_base}/{rtype}/{created['id']}") as r:
                    seen = await r.json()
                async with http.get(f"{upstream.base_url}/{rtype}/{created['id']}", headers=FHIR_JSON) as r:
                    stored = await r.json()
                print(f"═══ {rtype}/{created['id']} ═══")
                print(side_by_side(seen, stored, width))
                print()
        blob = json.dumps(upstream.dump(), ensure_ascii=False)
        leaked = [n for n in written if n in blob]
        print(
            f"scan of everything the FHIR server stores: {len(leaked)} of {len(written)} plaintext PHI values "
            f"found{': ' + ', '.join(leaked) if leaked else ''}"
        )
        if keep_running:
            print(f"\nproxy: {proxy_base}   upstream: {upstream.base_url}   (Ctrl-C to stop)")
            await asyncio.Event().wait()
        return 1 if leaked else 0
    finally:
        await runner.cleanup()
        upstream.stop()


def run_demo(keep_running: bool = False) -> int:
    if not (ROOT / "tests" / "upstream_server.py").exists():
        print("error: the demo needs a source checkout of fhircrypt (it runs the test upstream)", file=sys.stderr)
        return 2
    keyring = _dev_keyring(ROOT / ".fhircrypt" / "demo")
    try:
        return asyncio.run(_demo(keyring, keep_running))
    except KeyboardInterrupt:
        return 0
