"""Vertex AI pipeline schedules: create one that starts a run of the template on a cron, list,
pause, resume and delete them (the ``schedule`` commands, ``vertex_commands``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..config import ConfigError
from .vertex import RunSettings, VertexOpsError, make_job, template_source


def _rfc3339(value: str | None, what: str) -> str | None:
    """Accept ISO 8601 with a UTC offset (``2026-12-01T02:00:00+01:00`` or ``...Z``)."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not an ISO 8601 time "
                          "(e.g. 2026-12-01T02:00:00Z)") from None
    if parsed.tzinfo is None:
        raise ConfigError(f"{what} {value!r} needs a UTC offset or Z (e.g. 2026-12-01T02:00:00Z)")
    return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cron_with_time_zone(cron: str, time_zone: str | None) -> str:
    """A cron and its time zone in Vertex's syntax.

    >>> cron_with_time_zone("0 3 * * *", "Europe/Berlin")
    'TZ=Europe/Berlin 0 3 * * *'
    >>> cron_with_time_zone("CRON_TZ=America/New_York 0 1 * * *", None)
    'TZ=America/New_York 0 1 * * *'
    """
    fields = cron.split()
    if fields and fields[0].startswith(("TZ=", "CRON_TZ=")):
        if time_zone:
            raise ConfigError("give the time zone either in the cron (TZ=...) or as --time-zone")
        time_zone = fields[0].partition("=")[2]
        fields = fields[1:]
    if len(fields) != 5:
        raise ConfigError(f"cron {cron!r} must have 5 fields: minute hour day-of-month month "
                          "day-of-week")
    if time_zone:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown time zone {time_zone!r} (use an IANA name such as "
                              "Europe/Berlin)") from None
        return f"TZ={time_zone} " + " ".join(fields)
    return " ".join(fields)


def create_schedule(
    run: RunSettings,
    *,
    cron: str,
    display_name: str,
    time_zone: str | None = None,
    start_time: str | None = None,
    end_time: str | None = None,
    max_concurrent_runs: int = 1,
    max_runs: int | None = None,
    allow_queueing: bool = False,
) -> str:
    """Create a schedule that starts a run of the template on a cron; return its resource name.

    Scheduled runs are not linked to an experiment by Vertex; the steps log their own
    experiment runs (``experiment`` pipeline parameter), so tracking still works.
    """
    if max_concurrent_runs < 1:
        raise ConfigError("max concurrent runs must be >= 1")
    if max_runs is not None and max_runs < 1:
        raise ConfigError("max runs must be >= 1")
    cron = cron_with_time_zone(cron, time_zone)
    start, end = _rfc3339(start_time, "start time"), _rfc3339(end_time, "end time")
    if start and end and end <= start:
        raise ConfigError(f"end time {end} is not after start time {start}")
    with template_source(run.template, run.images) as template_path:
        job = make_job(template_path, run, display_name=display_name, job_id=None)
        schedule = job.create_schedule(
            cron=cron, display_name=display_name, start_time=start, end_time=end,
            allow_queueing=allow_queueing, max_run_count=max_runs,
            max_concurrent_run_count=max_concurrent_runs, service_account=run.service_account,
            network=run.network)
    return schedule.resource_name


def _schedule(name: str, project: str, region: str, credentials):
    from google.api_core import exceptions
    from google.cloud import aiplatform

    try:
        return aiplatform.PipelineJobSchedule.get(name, project=project, location=region,
                                                  credentials=credentials)
    except exceptions.NotFound:
        raise VertexOpsError(f"schedule {name!r} not found in {project}/{region}") from None


def list_schedules(*, project: str, region: str, filter: str | None = None,
                   credentials=None) -> list[dict[str, Any]]:
    """Schedules of the project/region (optionally filtered, Vertex filter syntax) as dicts."""
    from google.cloud import aiplatform

    rows = []
    for s in aiplatform.PipelineJobSchedule.list(filter=filter, project=project, location=region,
                                                 credentials=credentials):
        g = s.gca_resource
        rows.append({
            "name": g.name, "display_name": g.display_name, "state": g.state.name,
            "cron": g.cron, "max_concurrent_run_count": g.max_concurrent_run_count,
            "started_run_count": g.started_run_count,
            "next_run_time": _ts(g, "next_run_time"), "start_time": _ts(g, "start_time"),
            "end_time": _ts(g, "end_time"),
        })
    return rows


def _ts(resource, field: str) -> str:
    return getattr(resource, field).isoformat() if field in resource else ""


def pause_schedule(name: str, *, project: str, region: str, credentials=None) -> None:
    """Pause a schedule (no new runs start until it is resumed)."""
    _schedule(name, project, region, credentials).pause()


def resume_schedule(name: str, *, project: str, region: str, catch_up: bool = False,
                    credentials=None) -> None:
    """Resume a paused schedule; ``catch_up`` also starts the runs missed while paused."""
    schedule = _schedule(name, project, region, credentials)
    # PipelineJobSchedule.resume() drops its catch_up argument: call the API directly.
    schedule.api_client.resume_schedule(name=schedule.resource_name, catch_up=catch_up)


def delete_schedule(name: str, *, project: str, region: str, credentials=None) -> None:
    """Delete a schedule (runs it already started are kept)."""
    _schedule(name, project, region, credentials).delete()
