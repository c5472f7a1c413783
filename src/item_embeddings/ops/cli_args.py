"""Command-line options that several commands share: pipeline parameters and caching."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import param_help
from ..param_sources import given_params


def params_epilog() -> str:
    """Every pipeline parameter with its type, default and meaning (``--help`` epilogues)."""
    lines = ["pipeline parameters (--set NAME=VALUE or keys of --config FILE.yaml):"]
    for name, kind, default, help_text in param_help():
        lines.append(f"  {name} ({kind}, default {default!r}): {help_text}")
    return "\n".join(lines)


def add_param_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of pipeline parameters (flat, or under 'parameters:')")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE", help="override one pipeline parameter (repeatable)")


def given_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters given on the command line: ``--config``, then ``--set``, then the
    shorthands ``--items`` and ``--previous``."""
    return given_params(args.config, args.overrides, items_uri=getattr(args, "items", None),
                        previous_uri=getattr(args, "previous", None))


def add_local_caching_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-caching", dest="enable_caching", action="store_false",
                        help="run every task again (by default a task whose inputs match a "
                             "finished task of an earlier run in --output-dir reuses its "
                             "outputs: its parameters, and the contents of the items table and "
                             "of the previous set, which the fingerprint task hashes every run)")
