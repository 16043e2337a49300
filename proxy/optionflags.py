"""Command-line flags generated from the options table, and their resolution, for every subcommand.

Each command names the options it takes (:func:`proxy.settings.options_in`); their flags, help
(with default and environment variable) and parsing come from :data:`proxy.settings.OPTIONS`,
and :func:`settings_from_args` resolves them through :func:`proxy.settings.resolve`, so
``serve``, ``keys``, ``shred``, ``reencrypt`` and ``coverage`` share one precedence (flags >
``FHIRCRYPT_*`` > config file > defaults) and one ``_FILE`` handling of secrets.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from proxy.settings import CONFIG_ENV, OPTIONS, Option, Resolved, Settings, parse_bool, resolve


def _attr(prefix: str) -> str:
    return prefix.replace("-", "_")


def add_option_flags(p: argparse.ArgumentParser, options: tuple[Option, ...] = OPTIONS, prefix: str = "") -> None:
    """One flag per option (``--<prefix><name>``); a secret only as ``--<name>-file`` (a path, never the value).

    Flags default to None so that a flag left out is told from one given: the model then
    resolves the environment, the file and the default, which the help text shows.
    """
    p.allow_abbrev = False  # else --upstream-token <value> would be taken for --upstream-token-file <path>
    attr = _attr(prefix)
    if not prefix:
        p.add_argument("--config", help=f"YAML configuration file (or {CONFIG_ENV})")
    p.set_defaults(**{attr + "options": options})
    for opt in options:
        named = Option(attr + opt.name, opt.help)  # the flag and environment variable under the prefix
        if opt.secret:
            p.add_argument(
                named.flag + "-file", dest=named.name + "_file", default=None, help=f"file holding the {opt.help}"
            )
            continue
        shown = "required; " if opt.required else "" if opt.default is None else f"default {opt.default}; "
        help_text = f"{opt.help} [{shown}env {named.env}]".replace("%", "%%")
        if opt.parse is parse_bool:
            p.add_argument(
                named.flag, dest=named.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            p.add_argument(named.flag, dest=named.name, choices=opt.choices, default=None, help=help_text)


def resolve_args(args: argparse.Namespace, prefix: str = "", environ: Mapping[str, str] | None = None) -> Resolved:
    """The options the parser declared with :func:`add_option_flags`, resolved like every command's."""
    attr = _attr(prefix)
    options: tuple[Option, ...] = getattr(args, attr + "options")
    dests = [attr + (o.name + "_file" if o.secret else o.name) for o in options]
    flags = {dest: getattr(args, dest) for dest in dests}
    env = os.environ if environ is None else environ
    return resolve(flags, env, getattr(args, "config", None), options, attr)


def settings_from_args(args: argparse.Namespace, prefix: str = "") -> Settings:
    return resolve_args(args, prefix).settings()
