"""Commands that change the keyring, run at the same time: none loses another's key."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from proxy.keymgmt.keyring import KeyringError, keyring_lock, load_keyring, update_keyring
from proxy.keymgmt.providers import build_provider
from tests.conftest import ROOT
from tests.test_cli_tls import run_cli
from tests.test_records import PATIENT, encrypted, read


def _new_keyring(tmp_path):
    ring, kek = tmp_path / "ring.json", tmp_path / "kek"
    out = run_cli("keys", "init", "--keyring", str(ring), "--generate-kek", str(kek))
    assert out.returncode == 0, out.stderr
    return ring, kek, build_provider({"type": "local", "kek_file": str(kek)}, {})


def test_twenty_concurrent_rotations_keep_every_key_and_every_record_written_meanwhile(tmp_path):
    ring, kek, provider = _new_keyring(tmp_path)
    command = [sys.executable, "-m", "proxy", "keys", "rotate", "--keyring", str(ring), "--kek-file", str(kek)]
    runs = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(20)
    ]
    # meanwhile a writer picks up whatever keyring is on disk (as a proxy does on its key refresh)
    # and writes records under its primary key
    records = []
    while any(run.poll() is None for run in runs):
        current = load_keyring(ring, provider)
        records.append((current.primary_id, encrypted(PATIENT, current)))
        time.sleep(0.02)
    outputs = [run.communicate(timeout=120) for run in runs]

    assert [run.returncode for run in runs] == [0] * 20, [err for _, err in outputs if err]
    announced = [re.fullmatch(r"new primary key (k\d+);.*\n", out).group(1) for out, _ in outputs]
    assert len(set(announced)) == 20
    final = load_keyring(ring, provider)
    assert set(final.key_ids) == {"k1", *announced}
    assert {kid for kid, _ in records} - {"k1"}, "no record was written under a rotated key"
    for _, stored in records:
        back, report = read(stored, final)
        assert report.failures == [] and back == PATIENT


def test_a_change_waits_for_the_lock_and_gives_up_clearly_after_its_timeout(tmp_path):
    ring, kek, provider = _new_keyring(tmp_path)
    before = ring.read_bytes()
    with keyring_lock(ring), pytest.raises(KeyringError, match="being changed by another process"):
        update_keyring(ring, provider, lambda keyring: keyring.rotate(), timeout=0.3)
    assert ring.read_bytes() == before

    # while another process holds the lock, a rotation waits (and writes nothing); then it goes ahead
    with keyring_lock(ring):
        waiting = subprocess.Popen(
            [sys.executable, "-m", "proxy", "keys", "rotate", "--keyring", str(ring), "--kek-file", str(kek)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiting.poll() is None and ring.read_bytes() == before
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "new primary key k2" in out and load_keyring(ring, provider).key_ids == ["k1", "k2"]
