"""Commands that work on this machine: ``compile``, ``run-local``, ``demo``, ``runs``, ``params``,
``verify`` and ``estimate``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

from ..config import ConfigError, PipelineParams, param_description
from ..errors import EXIT_FAILED
from ..estimate import ESTIMATE_PARAMS, Choices, Rates, count_items, estimate, parse_count
from ..param_sources import resolve_params
from .cli_args import add_local_caching_option, add_param_options, given_parameters, params_epilog
from .console import RunConsole

_RAW = argparse.RawDescriptionHelpFormatter


def _cmd_compile(args: argparse.Namespace) -> int:
    from ..components import DEFAULT_IMAGE
    from ..pipeline import compile_pipeline
    from .vertex import Images

    if args.target == "vertex":
        Images(cpu=args.image, gpu=args.gpu_image).require(
            instead="--target local for a template that kfp.local runs")
    path = compile_pipeline(args.output, target=args.target, image=args.image or DEFAULT_IMAGE,
                            gpu_image=args.gpu_image, pipeline_root=args.pipeline_root)
    print(f"compiled pipeline template ({args.target}) -> {path}")
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from ..progress import setup_logging
    from . import local_run

    setup_logging()
    params = PipelineParams(**given_parameters(args))
    local_run.run_local(params, args.output_dir, enable_caching=args.enable_caching)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..progress import setup_logging
    from ..sample import SampleImageServer, write_sample_catalogue
    from .local_run import (
        RUN_LOG,
        check_output_dir,
        check_params,
        needs_model_hub,
        probe_hub,
        run_local,
    )

    setup_logging()
    # Parameters, then the output directory, are checked before anything is written or served.
    items_path = Path(args.output_dir).resolve() / "sample_items.parquet"
    # The sample's images are served on loopback, which the download guard refuses by default.
    if args.items_count < 2:
        raise ConfigError(f"--items-count must be at least 2, got {args.items_count}")
    params = resolve_params(args.config, ["allow_private_hosts=true", *args.overrides],
                            items_uri=str(items_path))
    check_params(params)  # (a knn_k above the sample's size is lowered by the kNN step)
    out = check_output_dir(args.output_dir)
    with RunConsole(out / RUN_LOG) as console, SampleImageServer() as server:
        items = write_sample_catalogue(items_path, args.items_count, server.base_url)
        console.say(f"sample catalogue: {items} ({args.items_count} items; images at "
                    f"{server.base_url})")
        hub_online = probe_hub(console) if needs_model_hub(params) else None
        params = _demo_image_weights(params, console, hub_online)
        run_local(params, out, enable_caching=args.enable_caching, console=console,
                  hub_online=hub_online)
    return 0


def _demo_image_weights(params: PipelineParams, console: RunConsole,
                        hub_online: bool | None) -> PipelineParams:
    """The demo's image weights: the default CLIP weights (downloaded, or from the cache when the
    hub is unreachable), or random ones, said loudly, when they cannot be had."""
    from ..image import prefetch_pretrained
    from ..runtime import hub_offline

    if hub_online is None:  # nothing of the run is on the hub: no image weights to fetch
        return params
    try:
        with contextlib.nullcontext() if hub_online else hub_offline():
            prefetch_pretrained(params.image_model, params.image_pretrained)
    except Exception as exc:
        where = "downloaded here" if hub_online else "found in the local cache (hub offline)"
        console.say(f"NOTE: open_clip weights {params.image_pretrained!r} for "
                    f"{params.image_model!r} cannot be {where} ({type(exc).__name__}); this "
                    "demo run uses RANDOM image weights (image_pretrained=none), so its image "
                    "vectors carry no meaning. Set --set image_pretrained=/path/to/checkpoint.pt "
                    "for real ones.")
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


def _cmd_estimate(args: argparse.Namespace) -> int:
    host_share = args.largest_host_share
    if args.items_file:
        for option, given in (("--image-fraction", args.image_fraction),
                              ("--largest-host-share", host_share)):
            if given is not None:
                raise ConfigError(f"{option} goes with --items N; with --items-file the image "
                                  "URLs and their hosts are counted")
        items, image_items, host_share = count_items(args.items_file, args.image_url_column)
    else:
        items = parse_count(args.items)
        fraction = 1.0 if args.image_fraction is None else args.image_fraction
        if not 0 <= fraction <= 1:
            raise ConfigError(f"--image-fraction must be between 0 and 1, got {fraction}")
        image_items = round(items * fraction)
    params = resolve_params(args.config, args.overrides,
                            **{name: getattr(args, name) for name in ESTIMATE_PARAMS})
    choices = Choices(items, image_items, params, changed_fraction=args.changed_fraction,
                      largest_host_share=host_share)
    result = estimate(choices, Rates.load(args.rates))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 0


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``compile``, ``run-local``, ``demo``, ``runs``, ``params``, ``verify`` and
    ``estimate``."""
    p = sub.add_parser("compile", help="compile the pipeline to a YAML template",
                       description="Compile the pipeline to a KFP YAML template.")
    p.add_argument("--output", required=True, metavar="FILE.yaml", help="template path to write")
    p.add_argument("--target", choices=["vertex", "local"], default="vertex",
                   help="where the template will run (default: vertex)")
    p.add_argument("--image", metavar="URI",
                   help="image of the CPU steps: your build of Dockerfile (required for vertex)")
    p.add_argument("--gpu-image", metavar="URI",
                   help="image of the T4 image step: your build of Dockerfile.gpu (required for "
                        "vertex)")
    p.add_argument("--pipeline-root", metavar="gs://BUCKET/PATH",
                   help="default root of the runs' artifacts, so that runs started from the "
                        "Vertex AI UI have one (submit --pipeline-root overrides it)")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run-local", help="run the whole pipeline on this machine (kfp.local)",
                       description="Run the pipeline with kfp.local and place the final files "
                                   "flat in --output-dir.\nA failed run resumes when rerun into "
                                   "the same --output-dir: its finished tasks come\nfrom the "
                                   "cache (see --no-caching).",
                       formatter_class=_RAW, epilog=params_epilog())
    p.add_argument("--items", metavar="PATH",
                   help="items parquet file or folder (local or gs://); same as --set items_uri=")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the files go")
    p.add_argument("--previous", metavar="DIR_OR_URI",
                   help="an earlier output set (folder or gs:// publish prefix) whose vectors "
                        "are reused for unchanged items; same as --set previous_uri=")
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

    _add_estimate(sub)


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    defaults = PipelineParams()
    p = sub.add_parser(
        "estimate", help="expected wall time and cost of a Vertex AI run",
        formatter_class=_RAW,
        description="Print the expected wall time and cost of each step and of a Vertex AI run, "
                    "from the per-item rates this project's benchmarks measured and dated list "
                    "prices (src/item_embeddings/estimate_rates.json: every number with its "
                    "basis, source and date; the output lists the ones used and every "
                    "assumption). The parameters are the pipeline's: take them from the run's "
                    "--config file and --set overrides, or give the ones below directly.",
        epilog="examples:\n"
               "  item-embeddings estimate --items 500k --shards 4\n"
               "  item-embeddings estimate --items 10M --image-fraction 0.8 --shards 64 \\\n"
               "      --max-parallel-shards 32 --text-machine-type c3-standard-8\n"
               "  item-embeddings estimate --items-file gs://B/items/ --config nightly.yaml "
               "--json\n"
               "  item-embeddings estimate --items 2M --config nightly.yaml "
               "--changed-fraction 0.02\n"
               "  item-embeddings estimate --items 2M --text-accelerator NVIDIA_TESLA_T4 "
               "--text-machine-type n1-standard-4")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--items", metavar="N", help="item count: 500000, 500k or 10M")
    size.add_argument("--items-file", metavar="PATH",
                      help="items parquet file or folder (local or gs://): rows and rows with "
                           "an http(s) image URL are counted")
    p.add_argument("--image-fraction", type=float, metavar="F",
                   help="with --items: share of items with an image URL (default 1)")
    p.add_argument("--largest-host-share", type=float, metavar="F",
                   help="with --items: share of the image URLs on their most frequent host "
                        "(default 1: one host, a catalogue on its own CDN); it bounds the "
                        "downloads at download_rate_per_host / F images/s per image worker")
    p.add_argument("--image-url-column", default=defaults.image_url_column, metavar="NAME",
                   help=f"with --items-file (default {defaults.image_url_column})")
    p.add_argument("--changed-fraction", type=float, default=1.0, metavar="F",
                   help="an incremental run (with previous_uri): share of the items whose text "
                        "or image changed since the previous set (default 1 = a full run)")
    add_param_options(p)
    for name in ESTIMATE_PARAMS:
        default = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE",
                       help=f"{param_description(name)} (default {default!r})")
    p.add_argument("--rates", metavar="FILE.json",
                   help="a copy of estimate_rates.json with your own rates or prices")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=_cmd_estimate)
