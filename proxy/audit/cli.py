"""``fhircrypt audit init`` and ``fhircrypt audit verify``: the two things an operator and an auditor do.

The initial key K_0 is the auditor's: ``init`` writes it once to a 0600 file and refuses to
overwrite one, because replacing K_0 would silently make every earlier record unverifiable.
The operator moves that file off the proxy host; the proxy itself only ever needs the state file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from proxy.audit.trail import (
    KEY_BYTES,
    AuditTrail,
    AuditTrailError,
    b64u,
    b64u_decode,
    default_state_path,
    new_initial_key,
    verify,
)


def write_key_file(key_file: str | os.PathLike[str], key: bytes) -> None:
    """Create ``key_file`` (mode 0600) holding ``key`` as one base64url line; never overwrite."""
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (b64u(key) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key_file(key_file: str | os.PathLike[str]) -> bytes:
    text = Path(key_file).read_text(encoding="ascii").strip()
    try:
        key = b64u_decode(text)
    except ValueError as exc:
        raise ValueError(f"{key_file}: not an audit key (base64url)") from exc
    if len(key) != KEY_BYTES:
        raise ValueError(f"{key_file}: an audit key is {KEY_BYTES} bytes")
    return key


def init_trail(
    path: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    state_path: str | os.PathLike[str] | None = None,
) -> None:
    """Create K_0 in ``key_file``, an empty trail at ``path`` and the writer's state file
    (default ``<path>.state``). Raises FileExistsError rather than overwrite any of them."""
    state = Path(state_path) if state_path is not None else default_state_path(path)
    for existing in (Path(key_file), state):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; refusing to overwrite it")
    if Path(path).exists() and Path(path).stat().st_size:
        raise FileExistsError(f"{path} already holds audit records; refusing to overwrite it")
    key = new_initial_key()
    write_key_file(key_file, key)
    try:
        AuditTrail(path, state).create(key).close()
    except BaseException:
        os.unlink(key_file)  # no orphan key for a trail that does not exist
        raise
    print(
        f"created audit trail {path} (state {state}); initial key in {key_file}: give it to the auditor and "
        "keep it off this host"
    )


def verify_trail(
    path: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    state_path: str | os.PathLike[str] | None = None,
) -> int:
    """Print ``OK: N records`` or ``BROKEN at record K (line L): reason``; return 0 or 1.

    With ``state_path`` the trail's end is also checked against the writer's state file."""
    try:
        key = load_key_file(key_file)
        result = verify(path, key, state_path=state_path)
    except (OSError, ValueError, AuditTrailError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0 if result.ok else 1
