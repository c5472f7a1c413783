"""Commands that work on this machine: ``compile``, ``run-local``, ``demo``, ``runs``, ``params``
and ``verify``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import PipelineParams, resolve_params
from .cli_args import (add_local_caching_option, add_param_options, given_parameters,
                       params_epilog)

EXIT_FAILED = 1
_RAW = argparse.RawDescriptionHelpFormatter


def _cmd_compile(args: argparse.Namespace) -> int:
    from ..pipeline import compile_pipeline

    kwargs = {"image": args.image} if args.image else {}
    path = compile_pipeline(args.output, target=args.target, **kwargs)
    print(f"compiled pipeline template ({args.target}) -> {path}")
    if args.target == "vertex" and not args.image:
        print("note: no --image given: the template names a placeholder image; build the "
              "Dockerfile, push it, and compile with --image URI before running on Vertex",
              file=sys.stderr)
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from ..progress import setup_logging
    from . import local_run

    setup_logging()
    params = PipelineParams(**given_parameters(args))
    placed = local_run.run_local(params, args.output_dir, enable_caching=args.enable_caching)
    _print_placed(Path(args.output_dir).resolve(), placed)
    return 0


def _print_placed(out: Path, placed: dict[str, Path]) -> None:
    from .local_run import KFP_ROOT, RUNS_DIR

    print(f"\nlocal run finished; outputs in {out}:")
    for name, path in placed.items():
        print(f"  {name:24s} {path.stat().st_size:>12,d} bytes")
    print(f"experiment runs: {out / RUNS_DIR} (list them: item-embeddings runs --output-dir {out})")
    print(f"kfp.local artifacts: {out / KFP_ROOT}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..progress import setup_logging
    from ..sample import SampleImageServer, write_sample_catalogue
    from .local_run import check_output_dir, run_local

    setup_logging()
    # Parameters, then the output directory, are checked before anything is written or served.
    items_path = Path(args.output_dir).resolve() / "sample_items.parquet"
    # The sample's images are served on loopback, which the download guard refuses by default.
    params = resolve_params(args.config, ["allow_private_hosts=true", *args.overrides],
                            items_uri=str(items_path))
    out = check_output_dir(args.output_dir)
    with SampleImageServer() as server:
        items = write_sample_catalogue(items_path, args.items_count, server.base_url)
        print(f"sample catalogue: {items} ({args.items_count} items; images at {server.base_url})")
        params = _demo_image_weights(params)
        placed = run_local(params, out, enable_caching=args.enable_caching)
    _print_placed(out, placed)
    return 0


def _demo_image_weights(params: PipelineParams) -> PipelineParams:
    """The demo's image weights: the default CLIP weights, or random ones (said loudly) offline."""
    from ..image import prefetch_pretrained

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
    from ..tracking import list_local_runs
    from .local_run import RUNS_DIR

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
    print(params_epilog())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..verify import verify_outputs

    report = verify_outputs(args.location)
    print(report.format())
    return 0 if report.ok else EXIT_FAILED


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``compile``, ``run-local``, ``demo``, ``runs``, ``params`` and ``verify``."""
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
                       formatter_class=_RAW, epilog=params_epilog())
    p.add_argument("--items", metavar="PATH",
                   help="items parquet file or folder (local or gs://); same as --set items_uri=")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the files go")
    add_param_options(p)
    add_local_caching_option(p)
    p.set_defaults(func=_cmd_run_local)

    p = sub.add_parser("demo", help="run the whole pipeline locally on the bundled sample",
                       description="Generate the bundled sample catalogue, serve its images on "
                                   "127.0.0.1 and run the whole pipeline locally (kfp.local).",
                       formatter_class=_RAW, epilog=params_epilog())
    p.add_argument("--output-dir", default="demo_out", metavar="DIR",
                   help="where the files go (default: demo_out)")
    p.add_argument("--items-count", type=int, default=120, metavar="N",
                   help="items in the sample catalogue (default: 120)")
    add_param_options(p)
    add_local_caching_option(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("runs", help="list local experiment runs",
                       description="Print the local experiment runs of an output directory.")
    p.add_argument("--output-dir", default=".", metavar="DIR",
                   help="output directory of run-local (default: current directory)")
    p.add_argument("--json", action="store_true", help="print the run records as JSON")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("params", help="list the pipeline parameters with defaults")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "verify", help="check an output set (local directory or published gs:// prefix)",
        formatter_class=_RAW,
        description="Print shapes, dtypes, counts and meta fields of an output set and check "
                    "its invariants (docs/outputs.md); exit 1 naming each violation.",
        epilog="examples:\n  item-embeddings verify out/\n"
               "  item-embeddings verify gs://B/embeddings/")
    p.add_argument("location", metavar="DIR_OR_URI", help="directory or gs:// prefix")
    p.set_defaults(func=_cmd_verify)
