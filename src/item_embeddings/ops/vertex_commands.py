"""Commands that drive Vertex AI: ``submit``, ``schedule`` (create, list, pause, resume, delete)
and ``upload``.

Parameter overrides work exactly as for ``run-local`` (``--config FILE.yaml`` and repeated
``--set name=value``); only the parameters given there are sent, the others keep the template's
defaults. The commands are thin layers over :mod:`.vertex`.
"""

from __future__ import annotations

import argparse
import json
import os

from ..config import ConfigError, PipelineParams
from .cli_args import add_param_options, given_parameters, params_epilog

_RAW = argparse.RawDescriptionHelpFormatter
EXIT_FAILED = 1


def _project(args: argparse.Namespace) -> str:
    if not args.project:
        raise ConfigError("--project is required (or set GOOGLE_CLOUD_PROJECT)")
    return args.project


def _add_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                   help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    p.add_argument("--region", default=os.environ.get("GOOGLE_CLOUD_REGION", "us-central1"),
                   help="Vertex AI region (default: $GOOGLE_CLOUD_REGION or us-central1)")


def _add_template(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--template", metavar="FILE_OR_URL",
                   help="compiled template (item-embeddings compile; local or gs://) or "
                        "Artifact Registry URL "
                        "https://REGION-kfp.pkg.dev/PROJECT/REPO/item-embeddings/TAG; "
                        "default: compile the pipeline now")
    g.add_argument("--image", metavar="URI",
                   help="when compiling now: the CPU steps' image (your build of Dockerfile); "
                        "there is no default")
    p.add_argument("--gpu-image", metavar="URI",
                   help="when compiling now: the T4 image step's image (your build of "
                        "Dockerfile.gpu); there is no default")
    p.add_argument("--compile-pipeline-root", metavar="gs://BUCKET/PATH",
                   help="when compiling now: the template's default pipeline root")


def _images(args: argparse.Namespace):
    from .vertex import Images

    return Images(cpu=args.image, gpu=args.gpu_image, pipeline_root=args.compile_pipeline_root)


def _add_run_settings(p: argparse.ArgumentParser) -> None:
    """Options shared by submit and schedule create (what one pipeline run is)."""
    _add_location(p)
    _add_template(p)
    p.add_argument("--pipeline-root", metavar="gs://BUCKET/PATH",
                   help="where the run's artifacts go (default: the template's)")
    p.add_argument("--service-account", metavar="EMAIL",
                   help="service account the tasks (and the T4 custom job) run as")
    p.add_argument("--network", metavar="projects/NUMBER/global/networks/NAME",
                   help="VPC network to peer the run (and its T4 custom job) with")
    p.add_argument("--encryption-key", metavar="projects/P/locations/L/keyRings/R/cryptoKeys/K",
                   help="Cloud KMS key (CMEK) for the run's resources, the T4 job included")
    p.add_argument("--label", dest="labels", action="append", default=[], metavar="KEY=VALUE",
                   help="label on the run (repeatable)")
    caching = p.add_mutually_exclusive_group()
    caching.add_argument("--caching", dest="enable_caching", action="store_const", const=True,
                         help="reuse results of identical earlier tasks (never for 'Fingerprint "
                              "inputs' and 'Publish outputs', which stay uncached)")
    caching.add_argument("--no-caching", dest="enable_caching", action="store_const",
                         const=False, help="run every task again")
    p.add_argument("--display-name", metavar="NAME", help="name shown in the console")
    p.add_argument("--items", metavar="URI", help="items parquet (same as --set items_uri=URI)")
    add_param_options(p)


def _run_settings(args: argparse.Namespace):
    from .vertex import RunSettings, parse_labels

    return RunSettings(project=_project(args), region=args.region,
                       parameter_values=given_parameters(args), template=args.template,
                       images=_images(args), pipeline_root=args.pipeline_root,
                       service_account=args.service_account, network=args.network,
                       encryption_key=args.encryption_key, labels=parse_labels(args.labels),
                       enable_caching=args.enable_caching)


def _cmd_submit(args: argparse.Namespace) -> int:
    from .vertex import submit_pipeline

    run = _run_settings(args)
    experiment = None
    if not args.no_experiment:
        experiment = (args.experiment or run.parameter_values.get("experiment")
                      or PipelineParams().experiment)
        # The steps log their own runs to the same experiment the job is linked to.
        run.parameter_values["experiment"] = experiment
    result = submit_pipeline(
        run, experiment=experiment, display_name=args.display_name, job_id=args.job_id,
        wait=args.wait, poll_interval_s=args.poll_interval, timeout_s=args.timeout,
        on_state=lambda state: print(f"state: {state}", flush=True))
    print(f"submitted {result.job_name}\n  console: {result.dashboard_uri}")
    if experiment:
        print(f"  experiment: {experiment}")
    if args.wait:
        print(f"finished: {result.state}")
    return 0


def _cmd_schedule_create(args: argparse.Namespace) -> int:
    from .schedules import create_schedule

    name = create_schedule(
        _run_settings(args), cron=args.cron, time_zone=args.time_zone,
        display_name=args.display_name or "item-embeddings-schedule",
        start_time=args.start_time, end_time=args.end_time,
        max_concurrent_runs=args.max_concurrent_runs, max_runs=args.max_runs,
        allow_queueing=args.allow_queueing)
    print(f"created schedule {name}")
    return 0


def _cmd_schedule_list(args: argparse.Namespace) -> int:
    from .schedules import list_schedules

    rows = list_schedules(project=_project(args), region=args.region, filter=args.filter)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no schedules")
    for row in rows:
        print(f"{row['name']}\n  {row['display_name']}  {row['state']}  cron '{row['cron']}'  "
              f"runs started {row['started_run_count']}  next {row['next_run_time'] or '-'}")
    return 0


def _cmd_schedule_action(args: argparse.Namespace) -> int:
    from . import schedules

    where = dict(project=_project(args), region=args.region)
    if args.action == "resume":
        schedules.resume_schedule(args.name, catch_up=args.catch_up, **where)
    else:
        {"pause": schedules.pause_schedule, "delete": schedules.delete_schedule}[args.action](
            args.name, **where)
    print(f"{args.action}d schedule {args.name}")
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from .vertex import registry_host, upload_template

    if args.host:
        host = args.host
    elif args.repository:
        host = registry_host(args.region, _project(args), args.repository)
    else:
        raise ConfigError("give --host https://REGION-kfp.pkg.dev/PROJECT/REPO or --repository")
    result = upload_template(host, template=args.template, images=_images(args),
                             tags=args.tags or ["latest"])
    print(f"uploaded {result.package} {result.version}\n  {result.version_url}")
    for url in result.tag_urls.values():
        print(f"  {url}")
    return 0


def _add_submit_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit a pipeline run to Vertex AI Pipelines", formatter_class=_RAW,
        description="Create a Vertex AI pipeline run (compiling the pipeline first unless "
                    "--template is given), linked to a Vertex AI experiment.",
        epilog="examples:\n"
               "  item-embeddings submit --project P --region us-central1 \\\n"
               "      --pipeline-root gs://B/pipeline-root --config prod.yaml \\\n"
               "      --set items_uri=gs://B/items/ --service-account SA@P.iam.gserviceaccount.com"
               " --wait\n"
               "  item-embeddings submit --project P --items gs://B/items/ --no-caching \\\n"
               "      --template https://us-central1-kfp.pkg.dev/P/pipelines/item-embeddings/"
               "latest\n\n"
               "exit status: 0 submitted (or succeeded with --wait), 1 failed run or API error, "
               "2 bad arguments\n\n" + params_epilog())
    _add_run_settings(p)
    p.add_argument("--experiment", metavar="NAME",
                   help="Vertex AI experiment to link the run to (default: the 'experiment' "
                        "parameter, recsys-dev)")
    p.add_argument("--no-experiment", action="store_true", help="do not link to an experiment")
    p.add_argument("--job-id", metavar="ID", help="job id (default: item-embeddings-TIMESTAMP)")
    p.add_argument("--wait", action="store_true",
                   help="poll the run until it ends; exit 1 if it fails or is cancelled")
    p.add_argument("--poll-interval", type=float, default=30.0, metavar="S",
                   help="seconds between state polls with --wait (default: 30)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="stop waiting after S seconds (exit 1; the run keeps going)")
    p.set_defaults(func=_cmd_submit)


def _add_schedule_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="create, list, pause, resume or delete run schedules",
                       description="Manage Vertex AI pipeline schedules (cron-triggered runs).",
                       formatter_class=_RAW,
                       epilog="examples:\n"
                              "  item-embeddings schedule create --project P --cron '0 3 * * *' "
                              "--time-zone Europe/Berlin --items gs://B/items/\n"
                              "  item-embeddings schedule list --project P\n"
                              "  item-embeddings schedule pause --project P 1234567890")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = actions.add_parser(
        "create", help="create a schedule", formatter_class=_RAW,
        description="Create a schedule that starts a run of the template on a cron. Scheduled "
                    "runs are not linked to an experiment by Vertex; the steps log their own "
                    "experiment runs (parameter 'experiment').",
        epilog="examples:\n"
               "  item-embeddings schedule create --project P --pipeline-root gs://B/root \\\n"
               "      --template https://us-central1-kfp.pkg.dev/P/pipelines/item-embeddings/"
               "latest \\\n"
               "      --cron '0 3 * * *' --time-zone Europe/Berlin --config prod.yaml \\\n"
               "      --start-time 2026-12-01T00:00:00Z --max-concurrent-runs 1\n\n"
               + params_epilog())
    _add_run_settings(c)
    c.add_argument("--cron", required=True, metavar="'M H DOM MON DOW'",
                   help="5-field cron expression, e.g. '0 3 * * *' (daily 03:00)")
    c.add_argument("--time-zone", metavar="IANA_NAME",
                   help="time zone of the cron, e.g. Europe/Berlin (default: UTC)")
    c.add_argument("--start-time", metavar="ISO8601",
                   help="first possible run, with offset, e.g. 2026-12-01T00:00:00Z")
    c.add_argument("--end-time", metavar="ISO8601", help="no runs after this time")
    c.add_argument("--max-concurrent-runs", type=int, default=1, metavar="N",
                   help="runs of this schedule at once (default: 1)")
    c.add_argument("--max-runs", type=int, metavar="N", help="stop after N runs")
    c.add_argument("--allow-queueing", action="store_true",
                   help="queue a run when --max-concurrent-runs are active (default: skip it)")
    c.set_defaults(func=_cmd_schedule_create)

    c = actions.add_parser("list", help="list schedules",
                           description="List the pipeline schedules of a project and region.")
    _add_location(c)
    c.add_argument("--filter", metavar="EXPR",
                   help="Vertex filter, e.g. 'display_name=\"nightly\"' or 'state=\"ACTIVE\"'")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_cmd_schedule_list)

    for action, text in (("pause", "pause a schedule (no new runs until resumed)"),
                         ("resume", "resume a paused schedule"),
                         ("delete", "delete a schedule (started runs are kept)")):
        c = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        _add_location(c)
        c.add_argument("name", metavar="SCHEDULE",
                       help="schedule id or projects/P/locations/R/schedules/ID")
        if action == "resume":
            c.add_argument("--catch-up", action="store_true",
                           help="also start the runs missed while paused")
        c.set_defaults(func=_cmd_schedule_action)


def _add_upload_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upload", help="push the compiled template to Artifact Registry", formatter_class=_RAW,
        description="Upload the pipeline template to an Artifact Registry KFP repository with "
                    "version tags; the Vertex AI UI can then create runs and reruns from it, "
                    "and submit/schedule accept its URL as --template.",
        epilog="examples:\n"
               "  item-embeddings upload --project P --region us-central1 --repository pipelines"
               " --tag v1.2.0 --tag latest\n"
               "  item-embeddings upload --host https://us-central1-kfp.pkg.dev/P/pipelines "
               "--template item_embeddings.yaml\n"
               "(create the repository once: gcloud artifacts repositories create pipelines "
               "--repository-format=kfp --location=us-central1)")
    _add_location(p)
    _add_template(p)
    p.add_argument("--host", metavar="URL", help="https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY")
    p.add_argument("--repository", metavar="NAME",
                   help="Artifact Registry repository (with --project/--region instead of "
                        "--host)")
    p.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                   help="version tag (repeatable; default: latest)")
    p.set_defaults(func=_cmd_upload)


def _cmd_preflight(args: argparse.Namespace) -> int:
    from ..config import check_machines
    from .preflight import run_preflight

    params = PipelineParams(**given_parameters(args))
    check_machines(params)
    project = _project(args)
    print(f"preflight of a run in {project}/{args.region} (read-only)", flush=True)
    checks = run_preflight(project, args.region, params, pipeline_root=args.pipeline_root,
                           images=[i for i in (args.image, args.gpu_image) if i],
                           service_account=args.service_account,
                           on_check=lambda check: print(check.line(), flush=True))
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "fail", "warn", "skip")}
    print(f"{len(checks)} checks: {counts['ok']} ok, {counts['fail']} failed, "
          f"{counts['warn']} could not tell, {counts['skip']} skipped")
    return EXIT_FAILED if counts["fail"] else 0


def _add_preflight_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preflight", help="check, read-only, what makes a first Vertex run fail",
        formatter_class=_RAW,
        description="Check, without changing anything, what a run of these parameters needs in "
                    "the project and region: the APIs enabled, the pipeline root (and the "
                    "items/publish buckets) writable by the service account "
                    "(testIamPermissions), the images present in Artifact Registry, and the "
                    "Vertex AI custom-training quotas (vCPUs, T4 GPUs, Spot/preemptible) against "
                    "what the parameters ask for at once. One line per check; docs/operations.md "
                    "lists what each one calls.",
        epilog="examples:\n"
               "  item-embeddings preflight --project P --region us-central1 \\\n"
               "      --pipeline-root gs://B/pipeline-root --config prod.yaml \\\n"
               "      --image us-central1-docker.pkg.dev/P/item-embeddings/item-embeddings:abc1234"
               " \\\n      --gpu-image us-central1-docker.pkg.dev/P/item-embeddings/"
               "item-embeddings-gpu:abc1234 \\\n"
               "      --service-account runner@P.iam.gserviceaccount.com\n\n"
               "exit status: 0 every check passed (some may be skipped or undecided), 1 a check "
               "failed, 2 bad arguments\n\n" + params_epilog())
    _add_location(p)
    p.add_argument("--pipeline-root", metavar="gs://BUCKET/PATH",
                   help="the runs' pipeline root (checked for write access)")
    p.add_argument("--image", metavar="URI", help="the CPU steps' image (checked in Artifact "
                                                  "Registry)")
    p.add_argument("--gpu-image", metavar="URI", help="the T4 image step's image")
    p.add_argument("--service-account", metavar="EMAIL",
                   help="the runs' service account: bucket access is checked as it (by "
                        "impersonation); default: as you")
    p.add_argument("--items", metavar="URI", help="items parquet (same as --set items_uri=URI)")
    add_param_options(p)
    p.set_defaults(func=_cmd_preflight)


def add_vertex_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``schedule``, ``upload`` and ``preflight``."""
    _add_submit_command(sub)
    _add_schedule_commands(sub)
    _add_upload_command(sub)
    _add_preflight_command(sub)
