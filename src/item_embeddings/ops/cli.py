"""``item-embeddings``: the command line (``item-embeddings COMMAND --help`` for each command).

Exit status, for every command: 0 success; 1 the operation failed (a failed run, an API refusal,
missing credentials, verify violations); 2 a bad command line (unknown flag or parameter,
missing config file, bad value, unusable items table or previous set).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_FAILED, ItemEmbeddingsError
from .local_commands import add_local_commands
from .vertex_commands import add_vertex_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="item-embeddings",
        description="Multimodal item embedding pipeline for Kubeflow Pipelines / Vertex AI.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  item-embeddings run-local --items items.parquet --output-dir out/\n"
               "  item-embeddings compile --output item_embeddings.yaml --image CPU_IMAGE "
               "--gpu-image GPU_IMAGE\n"
               "  item-embeddings runs --output-dir out/")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_local_commands(sub)
    add_vertex_commands(sub)
    return parser


def exit_code(exc: BaseException) -> int | None:
    """The exit status for an error a command reports as a message; None for a bug (re-raised).

    Every project error carries its own status (``errors.ItemEmbeddingsError.exit_status``);
    Google API and credential errors are failed operations."""
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    if isinstance(exc, ItemEmbeddingsError):
        return exc.exit_status
    if isinstance(exc, (GoogleAPIError, GoogleAuthError)):
        return EXIT_FAILED
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"item-embeddings {args.command}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
