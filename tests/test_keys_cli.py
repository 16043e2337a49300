"""`fhircrypt keys` and `serve` with every key provider, and KEK rotation by `keys rewrap`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import orjson

from proxy.keymgmt.keycache import KeyCache
from proxy.keymgmt.providers import build_provider
from tests.conftest import FHIR_JSON, ROOT
from tests.keystores import PIN, VAULT_TOKEN, free_port, wait_for_http
from tests.test_cli_tls import run_cli
from tests.test_proxy import POLICY, _new
from tests.test_records import PATIENT


def _hsm_env(softhsm) -> dict[str, str]:
    return {**softhsm.env, "FHIRCRYPT_PKCS11_PIN_FILE": str(softhsm.pin_file)}


def test_keys_init_rotate_list_on_an_hsm_never_show_the_pin(softhsm, tmp_path):
    ring, env = str(tmp_path / "ring.json"), _hsm_env(softhsm)
    created = run_cli("keys", "init", "--keyring", ring, *softhsm.flags("kek-a"), env=env)
    assert created.returncode == 0, created.stderr
    assert "wrapped by the pkcs11 KEK (token_label fhircrypt-test, key_label kek-a)" in created.stdout
    assert run_cli("keys", "rotate", "--keyring", ring, *softhsm.flags("kek-a"), env=env).returncode == 0
    listed = run_cli("keys", "list", "--keyring", ring, *softhsm.flags("kek-a"), env=env)
    assert listed.stdout.split() == ["k1", "k2", "(primary)"]
    wrong = run_cli(
        "keys", "list", "--keyring", ring, *softhsm.flags("kek-a"), env={**softhsm.env, "FHIRCRYPT_PKCS11_PIN": "99999"}
    )
    assert wrong.returncode == 2 and "login failed, wrong PIN" in wrong.stderr
    other = run_cli("keys", "list", "--keyring", ring, *softhsm.flags("kek-b"), env=env)
    assert other.returncode == 2 and "key unwrap failed" in other.stderr and "key_label kek-a), but" in other.stderr
    local = run_cli("keys", "list", "--keyring", ring, env={"FHIRCRYPT_KEK": "A" * 64})
    assert local.returncode == 2 and "wrapped by the 'pkcs11' key provider, but 'local' is configured" in local.stderr
    for out in (created, listed, wrong, other, local):
        assert PIN not in out.stdout + out.stderr and "99999" not in out.stdout + out.stderr


async def test_rewrap_moves_the_kek_across_providers_and_old_data_still_decrypts(
    proxy_for, clean_upstream, softhsm, kms, vault, tmp_path
):
    ring, kek = tmp_path / "ring.json", tmp_path / "kek"
    assert run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)).returncode == 0
    keyring_id = json.loads(ring.read_text())["id"]
    local = build_provider({"type": "local", "kek_file": str(kek)}, {})
    client = await proxy_for(clean_upstream.base_url, POLICY, ring=KeyCache(ring, local))
    resp = await client.post("/fhir/R4/Patient", data=orjson.dumps(_new(PATIENT)), headers=FHIR_JSON)
    assert resp.status == 201
    pid, stored = (await resp.json())["id"], clean_upstream.dump()

    env = {**_hsm_env(softhsm), **kms.env, "FHIRCRYPT_TO_VAULT_TOKEN": VAULT_TOKEN}
    kms_key = kms.new_key()
    vault.key("transit", "fhircrypt")
    steps = [
        (["--kek-file", str(kek)], softhsm.flags("kek-a", "to-")),  # local -> HSM
        (softhsm.flags("kek-a"), softhsm.flags("kek-b", "to-")),  # HSM key A -> key B (one PIN for both)
        (
            softhsm.flags("kek-b"),
            ["--to-key-provider", "aws-kms", "--to-aws-kms-key-id", kms_key, "--to-aws-kms-endpoint", kms.endpoint],
        ),
        (
            ["--key-provider", "aws-kms", "--aws-kms-key-id", kms_key, "--aws-kms-endpoint", kms.endpoint],
            ["--to-key-provider", "vault", "--to-vault-addr", vault.address, "--to-vault-key", "fhircrypt"],
        ),
    ]
    for source, target in steps:
        out = run_cli("keys", "rewrap", "--keyring", str(ring), *source, *target, env=env)
        assert out.returncode == 0, out.stderr
        assert "keys k1 (primary k1)" in out.stdout and "stored resources are unchanged" in out.stdout
        assert PIN not in out.stdout + out.stderr and VAULT_TOKEN not in out.stdout + out.stderr
        again = run_cli("keys", "list", "--keyring", str(ring), *source, env=env)
        assert again.returncode == 2  # the old KEK no longer opens the keyring
    doc = json.loads(ring.read_text())
    assert doc["id"] == keyring_id and doc["provider"]["type"] == "vault"
    assert clean_upstream.dump() == stored  # not one resource touched

    vault_provider = build_provider(vault.config(), {"FHIRCRYPT_VAULT_TOKEN": VAULT_TOKEN})
    reader = await proxy_for(clean_upstream.base_url, POLICY, ring=KeyCache(ring, vault_provider))
    read = await (await reader.get(f"/fhir/R4/Patient/{pid}")).json()
    assert read["name"] == PATIENT["name"] and read["birthDate"] == PATIENT["birthDate"]


def test_a_failed_rewrap_leaves_the_keyring_as_it_was(softhsm, tmp_path):
    ring, kek = tmp_path / "ring.json", tmp_path / "kek"
    assert run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)).returncode == 0
    before = ring.read_bytes()
    env = _hsm_env(softhsm)
    missing = run_cli(
        "keys", "rewrap", "--keyring", str(ring), "--kek-file", str(kek), *softhsm.flags("nope", "to-"), env=env
    )
    assert missing.returncode == 2 and "no AES key labelled 'nope'" in missing.stderr
    same = run_cli("keys", "rewrap", "--keyring", str(ring), "--kek-file", str(kek), "--to-kek-file", str(kek))
    assert same.returncode == 2 and "is the one the keyring uses now" in same.stderr
    assert ring.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek", "ring.json", "ring.json.lock"]

    out = tmp_path / "ring-hsm.json"
    staged = run_cli(
        "keys", "rewrap", "--keyring", str(ring), "--kek-file", str(kek), *softhsm.flags("kek-a", "to-"),
        "--out", str(out), env=env,
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    assert ring.read_bytes() == before and json.loads(out.read_text())["provider"]["type"] == "pkcs11"
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_serve_with_an_hsm_and_refusing_to_start_without_keys(softhsm, tmp_path, upstream):
    ring = str(tmp_path / "ring.json")
    env = _hsm_env(softhsm)
    assert run_cli("keys", "init", "--keyring", ring, *softhsm.flags("kek-a"), env=env).returncode == 0
    port = free_port()
    serve = [
        "serve", "--upstream", upstream.base_url, "--policy", "policies/satusehat.yaml", "--auth", "none",
        "--listen", f"127.0.0.1:{port}", "--keyring", ring, *softhsm.flags("kek-a"),
    ]  # fmt: skip
    refused = run_cli(*serve, env={**softhsm.env, "FHIRCRYPT_PKCS11_PIN": "00000000"})
    assert refused.returncode == 2 and "wrong PIN" in refused.stderr and "00000000" not in refused.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *serve], cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(base + "/healthz", proc)
        body = orjson.dumps({"resourceType": "Patient", "birthDate": "1955-05-05"})
        request = urllib.request.Request(base + "/fhir/R4/Patient", data=body, headers=FHIR_JSON, method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 201
        assert "1955-05-05" not in orjson.dumps(upstream.dump()).decode()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert '"key_provider":"pkcs11"' in err and PIN not in err
