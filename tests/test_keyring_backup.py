"""Keyring backup and restore (key loss is data loss): verified copies, and restores that never drop keys."""

from __future__ import annotations

import json
import stat

import orjson

from proxy.keymgmt.keyring import load_keyring
from proxy.keymgmt.providers.local import load_local_kek
from tests.conftest import FHIR_JSON, unit_policy
from tests.test_cli_tls import run_cli


async def test_a_restored_backup_reads_what_was_written_and_an_old_one_is_refused(tmp_path, proxy_for, clean_upstream):
    ring, kek, backup = tmp_path / "ring.json", tmp_path / "kek", tmp_path / "backup" / "ring-backup.json"
    assert run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)).returncode == 0
    env = {"FHIRCRYPT_KEK_FILE": str(kek)}
    done = run_cli("keys", "backup", "--keyring", str(ring), "--out", str(backup), env=env)
    assert done.returncode == 0, done.stderr
    assert "verified to open" in done.stdout and kek.read_text().strip() not in done.stdout + done.stderr
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert run_cli("keys", "backup", "--keyring", str(ring), "--out", str(backup), env=env).returncode == 2

    # data written with the keyring, then the keyring is lost and restored from the backup
    keyring = load_keyring(ring, load_local_kek(str(kek)))
    writer = await proxy_for(clean_upstream.base_url, unit_policy(), keyring)
    created = await (
        await writer.post(
            "/fhir/R4/Patient",
            data=orjson.dumps({"resourceType": "Patient", "birthDate": "1971-02-03"}),
            headers=FHIR_JSON,
        )
    ).json()
    ring.unlink()
    restored = run_cli("keys", "restore", "--from", str(backup), "--keyring", str(ring), env=env)
    assert restored.returncode == 0, restored.stderr
    reader = await proxy_for(clean_upstream.base_url, unit_policy(), load_keyring(ring, load_local_kek(str(kek))))
    assert (await (await reader.get(f"/fhir/R4/Patient/{created['id']}")).json())["birthDate"] == "1971-02-03"

    # after a rotation the old backup would drop k2: refused, and the keyring stays as it was
    assert run_cli("keys", "rotate", "--keyring", str(ring), env=env).returncode == 0
    before = ring.read_bytes()
    stale = run_cli("keys", "restore", "--from", str(backup), "--keyring", str(ring), env=env)
    assert stale.returncode == 2 and "lacks key(s) k2" in stale.stderr
    assert ring.read_bytes() == before

    # a tampered backup or the wrong KEK never replaces anything
    doc = json.loads(backup.read_text())
    doc["primary"] = "k9"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    assert run_cli("keys", "restore", "--from", str(tampered), "--keyring", str(ring), env=env).returncode == 2
    wrong = {"FHIRCRYPT_KEK": "A" * 64}
    assert run_cli("keys", "restore", "--from", str(backup), "--keyring", str(ring), env=wrong).returncode == 2
    assert ring.read_bytes() == before
