"""A throwaway PostgreSQL cluster for the tests of the shared patient key store.

Installs Debian's ``postgresql`` when no server binaries are found (CI runs on a fresh
machine, as root), then ``initdb`` into a temporary directory and ``pg_ctl start`` listening
only on a Unix socket in that directory - no port is taken on the machine, and nothing of
the host's own clusters is touched. PostgreSQL refuses to run as root, so as root the
cluster belongs to the ``postgres`` account the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and Path(found).resolve().with_name("initdb").exists():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def ensure_installed() -> Path:
    """The directory of initdb/pg_ctl, installing Debian's postgresql package if needed."""
    found = _bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("PostgreSQL server binaries are missing: apt-get install postgresql (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    found = _bin_dir()
    if found is None:
        raise RuntimeError("postgresql was installed but pg_ctl was not found")
    return found


class PostgresServer:
    """``start()`` a private cluster; ``url`` is its connection string; ``stop()`` removes it."""

    def __init__(self) -> None:
        self.bin = ensure_installed()
        self.dir = Path(tempfile.mkdtemp(prefix="fhircrypt-pg-"))
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.port = 5432  # only names the socket file in our private directory

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@/postgres?host={self.dir}&port={self.port}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.dir, self.user)
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -p {self.port} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
