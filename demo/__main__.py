"""python -m demo [--full] [--keep-running] [--port N] [--upstream-port N] [--coverage FILE.html]

Starts the test FHIR server, a development keyring and fhircrypt with
policies/satusehat.yaml, writes a SATUSEHAT-style transaction of sample resources
through the proxy, and shows what the application sees next to what the server stores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from demo.scenario import ROOT, run

KEEP_RUNNING_PORTS = (8080, 8103)  # the ports the README's curl lines use


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./dev demo", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--full", action="store_true", help="print every resource side by side (about 1,000 lines)")
    p.add_argument(
        "--keep-running", action="store_true", help="leave proxy and server running for curl (Ctrl-C stops them)"
    )
    p.add_argument("--port", type=int, help="proxy port (default: 8080 with --keep-running, else a free port)")
    p.add_argument("--upstream-port", type=int, help="test server port (default: 8103 with --keep-running, else free)")
    p.add_argument(
        "--coverage",
        metavar="FILE.html",
        type=Path,
        help="then scan the server with fhircrypt coverage: HTML report to FILE.html, JSON next to it",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    default_proxy, default_upstream = KEEP_RUNNING_PORTS if args.keep_running else (0, 0)
    port = default_proxy if args.port is None else args.port
    upstream_port = default_upstream if args.upstream_port is None else args.upstream_port
    try:
        return asyncio.run(
            run(ROOT, port, upstream_port, full=args.full, keep_running=args.keep_running, coverage=args.coverage)
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
