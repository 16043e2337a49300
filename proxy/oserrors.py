"""Operating-system errors as one line for an operator: the path(s) and the system's reason."""

from __future__ import annotations


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` (``A -> B: reason`` for a rename). Errors raised by our own code with a
    message (``FileExistsError("… exists; refusing …")``) keep that message."""
    if exc.strerror is None:
        return str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {exc.strerror}" if paths else exc.strerror
