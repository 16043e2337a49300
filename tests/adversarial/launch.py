"""Run the proxy app with any :class:`~proxy.settings.Settings` (a JSON object on argv), for tests.

``fhircrypt serve`` exposes most settings as flags; a few that tests must turn down (the audit
backlog, for a full disk within seconds) are not, so the fault tests start the same
``create_app`` + ``web.run_app`` the CLI runs through this module instead.
"""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from proxy.keymgmt.keyring import load_keyring
from proxy.keymgmt.providers.local import load_local_kek
from proxy.logs import configure
from proxy.policy.compiler import compile_file
from proxy.settings import Settings
from proxy.web.app import create_app


def main() -> None:
    settings = Settings(**orjson.loads(sys.argv[1]))
    configure("info")
    keyring = load_keyring(settings.keyring, load_local_kek(settings.kek_file))
    app = create_app(settings, compile_file(settings.policy), keyring)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
