"""Every command meets an unwritable or impossible path with one line naming it and exit code 2.

The tests often run as root, for whom permission bits mean nothing: the unwritable folder is
made immutable (``chattr +i``, which binds root too), the missing ones are a folder under a
regular file (ENOTDIR) and one under /proc (which refuses new entries).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_cli_tls import run_cli

UPSTREAM = "http://127.0.0.1:9/fhir/R4"
POLICY = "policies/satusehat.yaml"

# (name, arguments given the bad folder and the good one)
COMMANDS = [
    ("keys init", lambda bad, good: ["keys", "init", "--keyring", f"{bad}/ring.json"]),
    (
        "keys init --generate-kek",
        lambda bad, good: ["keys", "init", "--keyring", f"{good}/new.json", "--generate-kek", f"{bad}/kek"],
    ),
    ("keys rotate", lambda bad, good: ["keys", "rotate", "--keyring", f"{bad}/ring.json"]),
    ("keys list", lambda bad, good: ["keys", "list", "--keyring", f"{bad}/ring.json"]),
    (
        "keys rewrap",
        lambda bad, good: ["keys", "rewrap", "--keyring", f"{bad}/ring.json", "--to-kek-file", f"{good}/kek2"],
    ),
    (
        "keys backup",
        lambda bad, good: ["keys", "backup", "--keyring", f"{good}/ring.json", "--out", f"{bad}/backup.json"],
    ),
    (
        "keys restore",
        lambda bad, good: ["keys", "restore", "--keyring", f"{bad}/ring.json", "--from", f"{good}/backup.json"],
    ),
    ("audit init", lambda bad, good: ["audit", "init", "--trail", f"{bad}/trail", "--key-file", f"{bad}/k0"]),
    ("policy check", lambda bad, good: ["policy", "check", f"{bad}/policy.yaml"]),
    ("config show", lambda bad, good: ["config", "show", "--config", f"{bad}/fhircrypt.yaml"]),
    (
        "serve",
        lambda bad, good: [
            "serve",
            "--upstream",
            UPSTREAM,
            "--policy",
            POLICY,
            "--auth",
            "none",
            "--keyring",
            f"{good}/ring.json",
            "--audit-trail",
            f"{bad}/trail",
        ],
    ),
    (
        "shred hold list",
        lambda bad, good: [
            "shred",
            "hold",
            "list",
            "--keyring",
            f"{good}/ring.json",
            "--patient-key-store",
            f"{bad}/s.db",
        ],
    ),
]


@pytest.fixture
def folders(tmp_path):
    """A working folder with a keyring, its KEK and a backup, and the three bad places."""
    good = tmp_path / "good"
    good.mkdir()
    env = {"FHIRCRYPT_KEK_FILE": str(good / "kek")}
    assert (
        run_cli("keys", "init", "--keyring", str(good / "ring.json"), "--generate-kek", str(good / "kek")).returncode
        == 0
    )
    assert (
        run_cli(
            "keys", "backup", "--keyring", str(good / "ring.json"), "--out", str(good / "backup.json"), env=env
        ).returncode
        == 0
    )
    assert (
        run_cli(
            "keys", "init", "--keyring", str(tmp_path / "other.json"), "--generate-kek", str(good / "kek2")
        ).returncode
        == 0
    )
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    for name in ("ring.json", "backup.json"):  # what the writers would replace
        shutil.copy(good / name, sealed / name)
    _seal(sealed)
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    yield good, env, {"unwritable": sealed, "under a file": not_a_folder, "under /proc": Path("/proc/fhircrypt-none")}
    _unseal(sealed)


def _seal(folder: Path) -> None:
    folder.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no folder is unwritable for root")
    try:
        (folder / "probe").write_text("")
    except OSError:
        return
    pytest.fail(f"{folder} is still writable")


def _unseal(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("where", ["unwritable", "under a file", "under /proc"])
@pytest.mark.parametrize("name, command", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_an_os_error_is_one_line_naming_the_path_with_exit_code_2(folders, where, name, command):
    good, env, bad = folders
    out = run_cli(*command(bad[where], good), env=env)
    if where == "unwritable" and name == "keys list":  # reading needs no write access
        assert out.returncode == 0 and out.stdout.split() == ["k1", "(primary)"], out.stderr
        return
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if not line.startswith("{")]  # serve's JSON log lines
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert str(bad[where]) in lines[0] and "Traceback" not in out.stderr


def test_a_full_disk_is_one_line_naming_the_keyring(folders, tmp_path):
    """A 64 KiB file system of the test's own, filled up: in a user and mount namespace, so no privilege
    is needed and nothing is left mounted when the command ends."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available: no small file system to fill")
    good, env, _ = folders
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f'mount -t tmpfs -o size=64k tmpfs "{disk}" && cp "{good}/ring.json" "{disk}/" && '
        f'{{ head -c 1048576 /dev/zero > "{disk}/filler" 2>/dev/null; true; }} && '
        f'"{sys.executable}" -m proxy keys rotate --keyring "{disk}/ring.json"'
    )
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stderr) == (2, f"error: {disk}/ring.json: No space left on device\n")
