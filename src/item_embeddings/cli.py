"""``item-embeddings``: compile, run locally, list local experiment runs.

Run ``item-embeddings COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, param_help, resolve_params

EXIT_USAGE = 2


def _params_epilog() -> str:
    lines = ["pipeline parameters (--set NAME=VALUE or keys of --config FILE.yaml):"]
    for name, kind, default, help_text in param_help():
        lines.append(f"  {name} ({kind}, default {default!r}): {help_text}")
    return "\n".join(lines)


def _add_param_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of pipeline parameters (flat, or under 'parameters:')")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE", help="override one pipeline parameter (repeatable)")


def _add_local_caching_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-caching", dest="enable_caching", action="store_false",
                        help="run every task again (by default a task whose parameters and items "
                             "URI match an earlier run in --output-dir reuses its outputs; the "
                             "cache does not look at the items file's contents)")


def _cmd_compile(args: argparse.Namespace) -> int:
    from item_embeddings.pipeline import compile_pipeline

    kwargs = {"image": args.image} if args.image else {}
    path = compile_pipeline(args.output, target=args.target, **kwargs)
    print(f"compiled pipeline template ({args.target}) -> {path}")
    if args.target == "vertex" and not args.image:
        print("note: no --image given: the template names a placeholder image; build the "
              "Dockerfile, push it, and compile with --image URI before running on Vertex",
              file=sys.stderr)
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from .local_run import run_local
    from .progress import setup_logging

    setup_logging()
    params = resolve_params(args.config, args.overrides, items_uri=args.items)
    placed = run_local(params, args.output_dir, enable_caching=args.enable_caching)
    _print_placed(Path(args.output_dir).resolve(), placed)
    return 0


def _print_placed(out: Path, placed: dict[str, Path]) -> None:
    print(f"\nlocal run finished; outputs in {out}:")
    for name, path in placed.items():
        print(f"  {name:24s} {path.stat().st_size:>12,d} bytes")
    print(f"experiment runs: {out / 'runs'} (list them: item-embeddings runs --output-dir {out})")
    print(f"kfp.local artifacts: {out / '.kfp'}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .local_run import run_local
    from .progress import setup_logging
    from .sample import SampleImageServer, write_sample_catalogue

    setup_logging()
    out = Path(args.output_dir).resolve()
    with SampleImageServer() as server:
        items = write_sample_catalogue(out / "sample_items.parquet", args.items_count,
                                       server.base_url)
        print(f"sample catalogue: {items} ({args.items_count} items; images at {server.base_url})")
        # The sample's images are served on loopback, which the download guard refuses by default.
        params = resolve_params(args.config, ["allow_private_hosts=true", *args.overrides],
                                items_uri=str(items))
        params = _demo_image_weights(params)
        placed = run_local(params, out, enable_caching=args.enable_caching)
    _print_placed(out, placed)
    return 0


def _demo_image_weights(params):
    """The demo's image weights: the default CLIP weights, or random ones (said loudly) offline."""
    import dataclasses

    from .image import prefetch_pretrained

    try:
        prefetch_pretrained(params.image_model, params.image_pretrained)
    except Exception as exc:  # noqa: BLE001 - any download failure means: not available here
        print(f"NOTE: open_clip weights {params.image_pretrained!r} for {params.image_model!r} "
              f"cannot be downloaded here ({type(exc).__name__}); this demo run uses RANDOM "
              "image weights (image_pretrained=none), so its image vectors carry no meaning. "
              "Set --set image_pretrained=/path/to/checkpoint.pt for real ones.")
        return dataclasses.replace(params, image_pretrained="none")
    return params


def _cmd_runs(args: argparse.Namespace) -> int:
    from .local_run import RUNS_DIR
    from .tracking import list_local_runs

    root = Path(args.output_dir) / RUNS_DIR
    runs = list_local_runs(root)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no local runs under {root}")
        return 0
    header = ("experiment", "run", "status", "started", "metrics")
    rows = [(r.get("experiment", ""), r.get("run_name", ""), r.get("status", ""),
             r.get("start_time", ""),
             ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.get("metrics", {}).items())))
            for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    print(_params_epilog())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="item-embeddings",
        description="Multimodal item embedding pipeline for Kubeflow Pipelines / Vertex AI.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  item-embeddings run-local --items items.parquet --output-dir out/\n"
               "  item-embeddings compile --output item_embeddings.yaml\n"
               "  item-embeddings runs --output-dir out/")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("compile", help="compile the pipeline to a YAML template",
                       description="Compile the pipeline to a KFP YAML template.")
    p.add_argument("--output", required=True, metavar="FILE.yaml", help="template path to write")
    p.add_argument("--target", choices=["vertex", "local"], default="vertex",
                   help="where the template will run (default: vertex)")
    p.add_argument("--image", metavar="URI",
                   help="container image of the components (the project's image)")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run-local", help="run the whole pipeline on this machine (kfp.local)",
                       description="Run the pipeline with kfp.local and place the final files "
                                   "flat in --output-dir.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_params_epilog())
    p.add_argument("--items", metavar="PATH",
                   help="items parquet file or folder (local or gs://); same as --set items_uri=")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the files go")
    _add_param_options(p)
    _add_local_caching_option(p)
    p.set_defaults(func=_cmd_run_local)

    p = sub.add_parser("demo", help="run the whole pipeline locally on the bundled sample",
                       description="Generate the bundled sample catalogue, serve its images on "
                                   "127.0.0.1 and run the whole pipeline locally (kfp.local).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_params_epilog())
    p.add_argument("--output-dir", default="demo_out", metavar="DIR",
                   help="where the files go (default: demo_out)")
    p.add_argument("--items-count", type=int, default=120, metavar="N",
                   help="items in the sample catalogue (default: 120)")
    _add_param_options(p)
    _add_local_caching_option(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("runs", help="list local experiment runs",
                       description="Print the local experiment runs of an output directory.")
    p.add_argument("--output-dir", default=".", metavar="DIR",
                   help="output directory of run-local (default: current directory)")
    p.add_argument("--json", action="store_true", help="print the run records as JSON")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("params", help="list the pipeline parameters with defaults")
    p.set_defaults(func=_cmd_params)
    from .cli_ops import add_ops_commands  # here, not at the top: cli_ops imports cli
    add_ops_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .items import ItemsError
    from .local_run import LocalPipelineError

    try:
        return args.func(args)
    except (ConfigError, ItemsError) as exc:
        print(f"item-embeddings {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LocalPipelineError as exc:
        print(f"item-embeddings {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
