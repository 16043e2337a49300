"""The command line and TLS on both sides of the proxy."""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest
import trustme
from aiohttp import web

from proxy.cli import main
from tests.conftest import FHIR_JSON, ROOT, unit_policy


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_keys_init_rotate_list_never_print_key_material(tmp_path):
    ring, kek = tmp_path / "ring.json", tmp_path / "kek"
    out = run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600 and stat.S_IMODE(ring.stat().st_mode) == 0o600
    secret = kek.read_text().strip()
    assert secret not in out.stdout + out.stderr
    kek_id = json.loads(ring.read_text())["provider"]["kek_id"]
    assert out.stdout == f"created {ring}: primary key k1, wrapped by the local KEK (kek_id {kek_id})\n"
    again = run_cli("keys", "init", "--keyring", str(ring), "--kek-file", str(kek))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    rotated = run_cli("keys", "rotate", "--keyring", str(ring), env={"FHIRCRYPT_KEK": secret})
    assert rotated.returncode == 0 and "new primary key k2" in rotated.stdout
    listed = run_cli("keys", "list", "--keyring", str(ring), "--kek-file", str(kek))
    assert listed.stdout.split() == ["k1", "k2", "(primary)"]
    wrong = run_cli("keys", "list", "--keyring", str(ring), env={"FHIRCRYPT_KEK": "A" * 64})
    assert wrong.returncode == 2 and "wrong key-encryption key" in wrong.stderr
    # readable lines naming both KEKs, not Python dicts
    assert f"the keyring is wrapped by the local KEK (kek_id {kek_id}), but the local KEK (kek_id " in wrong.stderr
    assert not re.search(r"[{}]|': '", out.stdout + wrong.stderr)


def test_policy_check_explains_or_names_the_error(tmp_path):
    ok = run_cli("policy", "check", "policies/satusehat.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "Patient" in ok.stdout and "identifier.where(system='https://fhir.kemkes.go.id/id/nik').value" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "fhircrypt-policy: 1\nname: x\ngroups: {g: {}}\nresources:\n  Patient:\n    elements:\n"
        "      - {path: id, group: g}\n"
    )
    out = run_cli("policy", "check", str(bad))
    assert out.returncode == 2 and f"{bad}:7: path: 'id' cannot be encrypted" in out.stderr


def test_serve_refuses_to_start_without_authentication(capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as code:
            main(["serve", "--upstream", "http://127.0.0.1:1/fhir", "--policy", "policies/satusehat.yaml"])
    finally:  # serve installed its JSON handler on capsys's stream, which closes after this test
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code.value.code == 2
    assert "--auth none" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_over_https_with_settings_from_the_environment(tmp_path, upstream):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    ring, kek = tmp_path / "ring.json", tmp_path / "kek"
    assert run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)).returncode == 0
    port = _free_port()
    env = {
        **os.environ,
        "FHIRCRYPT_UPSTREAM": upstream.base_url,
        "FHIRCRYPT_POLICY": "policies/satusehat.yaml",
        "FHIRCRYPT_LISTEN": f"127.0.0.1:{port}",
        "FHIRCRYPT_KEYRING": str(ring),
        "FHIRCRYPT_KEK_FILE": str(kek),
        "FHIRCRYPT_TLS_CERT": str(cert_file),
        "FHIRCRYPT_TLS_KEY": str(key_file),
        "FHIRCRYPT_AUTH": "none",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        body = orjson.dumps({"resourceType": "Patient", "birthDate": "1966-06-06"})
        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(
                    f"https://127.0.0.1:{port}/fhir/R4/Patient", data=body, headers=FHIR_JSON, method="POST"
                )
                with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                    created = orjson.loads(resp.read())
                    assert resp.status == 201 and created["birthDate"] == "1966-06-06"
                    assert resp.headers["Location"].startswith(f"https://127.0.0.1:{port}/fhir/R4/Patient/")
                break
            except (ConnectionError, urllib.error.URLError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert "1966-06-06" not in orjson.dumps(upstream.dump()).decode()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "DEVELOPMENT MODE" in err
    assert "1966-06-06" not in err and str(kek.read_text().strip()) not in err


async def test_https_upstream_is_verified_against_the_configured_ca(proxy_for, aiohttp_server, tmp_path):
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def organization(request):
        return web.json_response({"resourceType": "Organization", "id": "o1"}, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/R4/Organization/o1", organization)
    server = await aiohttp_server(app, ssl=server_ctx)
    base = f"https://127.0.0.1:{server.port}/fhir/R4"
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    trusting = await proxy_for(base, unit_policy(), upstream_ca=str(ca_file))
    assert (await trusting.get("/fhir/R4/Organization/o1")).status == 200
    default = await proxy_for(base, unit_policy())  # system CAs do not know this CA: verification fails
    resp = await default.get("/fhir/R4/Organization/o1")
    assert resp.status == 502


def test_audit_init_and_verify_commands(tmp_path):
    trail, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    out = run_cli("audit", "init", "--trail", str(trail), "--key-file", str(key))
    assert out.returncode == 0, out.stderr
    assert key.read_text().strip() not in out.stdout + out.stderr
    from proxy.audit.trail import AuditTrail

    with AuditTrail(trail).open() as writer:
        for i in range(3):
            writer.append({"resourceType": "AuditEvent", "id": f"e{i}"})
    ok = run_cli("audit", "verify", str(trail), "--key-file", str(key))
    assert ok.returncode == 0 and "OK: 3 records" in ok.stdout
    lines = trail.read_text().splitlines()
    trail.write_text("\n".join([lines[0], lines[2]]) + "\n")
    broken = run_cli("audit", "verify", str(trail), "--key-file", str(key))
    assert broken.returncode == 1 and "BROKEN at record 1" in broken.stdout


def test_keys_init_warns_when_it_writes_the_kek_inside_a_git_work_tree(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "elsewhere"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    inside = run_cli("keys", "init", "--keyring", str(repo / "ring.json"), "--generate-kek", str(repo / "kek.txt"))
    assert inside.returncode == 0, inside.stderr
    assert f"inside the git work tree {repo} and git does not ignore it" in inside.stderr
    (repo / ".gitignore").write_text("kek*.txt\n")
    ignored = run_cli("keys", "init", "--keyring", str(repo / "r2.json"), "--generate-kek", str(repo / "kek2.txt"))
    assert ignored.returncode == 0 and "warning:" in ignored.stderr and "does not ignore" not in ignored.stderr
    quiet = run_cli("keys", "init", "--keyring", str(outside / "ring.json"), "--generate-kek", str(outside / "kek.txt"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_files_the_readme_commands_write_are_ignored_by_git():
    written = ["kek.txt", "keyring.json", "keyring.json.lock", "audit-k0.key", "audit.jsonl", "audit.jsonl.state"]
    out = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == written
