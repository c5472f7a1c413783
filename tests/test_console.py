"""The console of a local run (ops/console.py), the run log, the model hub probe and the demo."""

import json
import logging
import os
import re
import socket
import sys
import threading
import time

import pytest
from kfp import dsl

from helpers import check_console_of_a_run
from item_embeddings import runtime
from item_embeddings.ops.cli import main
from item_embeddings.ops.console import (
    RunConsole,
    TaskRecord,
    meta_counts,
    strip_ansi,
    summary_lines,
)
from item_embeddings.outputs import IMG_META, KNN_META, QA_REPORT, TXT_META
from item_embeddings.progress import LOG_FORMAT


# A tiny pipeline for kfp.local: the real shapes of its output, in seconds rather than a minute.
@dsl.component(base_image="python:3.11", install_kfp_package=False)
def talk(n: int) -> int:
    import logging

    from item_embeddings.progress import Progress, setup_logging

    setup_logging()
    print("some library chatter")
    logging.getLogger("item_embeddings.talk").info("talked %d times", n)
    with Progress(n, "talk", log_every_s=0.0, use_bar=False) as progress:
        progress.update(n)
    return n


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fail(n: int):
    raise ValueError(f"the failing task's own error, n={n}")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def slow_talk(n: int):
    import logging
    import time

    from item_embeddings.progress import setup_logging

    setup_logging()
    time.sleep(1.0)  # both workers are running before either says anything
    logging.getLogger("item_embeddings.talk").info("worker says %d", n)
    print(f"worker {n} chatter")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fail_leaving_tasks(n: int):
    """An IndexError in a process that leaves asyncio tasks pending (as an aiohttp download
    pool does when its step fails): at exit Python prints, after the traceback, a "Task was
    destroyed but it is pending!" and an "Exception ignored in:" block with a traceback of its
    own for each of them."""
    import asyncio

    async def forever():
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    for _ in range(12):
        loop.create_task(forever())
    loop.run_until_complete(asyncio.sleep(0))
    print(["a", "b"][n])


@dsl.pipeline(name="tiny-noise")
def fail_in_a_loop(n: int = 3):
    with dsl.ParallelFor([3]) as item:
        fail_leaving_tasks(n=item)


@dsl.pipeline(name="tiny-workers")
def workers(n: int = 3):
    with dsl.ParallelFor([1, 2, 3], parallelism=2) as item:
        slow_talk(n=item)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fail_until_fixed(n: int, fixed_flag: str):
    import os

    if not os.path.exists(fixed_flag):
        raise ValueError("not fixed yet")


@dsl.pipeline(name="tiny")
def talk_then_fail(n: int = 3):
    fail(n=talk(n=n).output)


@dsl.pipeline(name="tiny-resume")
def talk_then_check(n: int = 3, fixed_flag: str = ""):
    fail_until_fixed(n=talk(n=n).output, fixed_flag=fixed_flag)


@dsl.pipeline(name="tiny-ok")
def talk_only(n: int = 3):
    talk(n=n)


def _run(pipeline, root, console, caching=False):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True, enable_caching=caching)
    with console.capture():
        pipeline(n=3)


def test_capture_shows_steps_and_a_failed_tasks_error_and_logs_everything(tmp_path, capsys):
    log = tmp_path / "run.log"
    with RunConsole(log) as console:
        with pytest.raises(RuntimeError, match="FAILURE"):
            _run(talk_then_fail, tmp_path / "kfp", console)
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert out.splitlines()[0] == f"full log of this run: {log}"
    for expected in ["talk: started", "talk | talked 3 times",
                     "talk | talk: 3/3 items (100.0%)", "talk: done in", "fail: started"]:
        assert expected in out, expected
    assert "fail: FAILED in" in err
    assert "  | ValueError: the failing task's own error, n=3" in err
    assert err.rstrip().endswith(f"full log: {log}")
    assert "^^^" not in err  # traceback markers are left out of the short tail
    text = log.read_text()
    # everything kfp.local printed is in the log, and only there
    for noise in ["some library chatter", "executor_input", "Task 'talk' outputs:"]:
        assert noise in text and noise not in out + err, noise
    assert "\x1b[" not in out + err  # kfp.local's colours are stripped
    assert [(t.name, t.status) for t in console.tasks] == [("talk", "done"), ("fail", "failed")]
    assert all(t.seconds > 0 for t in console.tasks)


def test_a_failed_tasks_own_exception_is_shown_not_its_shutdown_noise(tmp_path, capsys):
    """The real exception of a failed task, as printed: its traceback ends the shown lines,
    the asyncio noise its process printed at exit (60 lines here) is only in the log, and the
    run's error names the task, not kfp.local's "inside 'for-loop-...'" chain."""
    log = tmp_path / "run.log"
    with RunConsole(log) as console:
        with pytest.raises(RuntimeError) as raised:
            _run(fail_in_a_loop, tmp_path / "kfp", console)
    err = capsys.readouterr().err
    text = log.read_text()
    assert text.count("Task was destroyed but it is pending!") == 12  # it happened: in the log
    assert text.count("Exception ignored in:") == 12
    assert "Task was destroyed" not in err and "Exception ignored" not in err
    shown = [line for line in err.splitlines() if line.startswith("  | ")]
    assert shown[0] == "  | Traceback (most recent call last):"
    assert shown[-1] == "  | IndexError: list index out of range"
    assert any("in fail_leaving_tasks" in line for line in shown)
    assert re.search(r"fail-leaving-tasks: FAILED in \d+\.\d s; the last "
                     rf"{len(shown)} lines of its output:", err)
    assert "inside 'for-loop-" in strip_ansi(str(raised.value))  # what kfp.local says ...
    assert console.failure(str(raised.value)) == (  # ... and what the run's error says
        "task fail-leaving-tasks failed: IndexError: list index out of range")


def test_capture_restores_streams_and_logging(tmp_path):
    root = logging.getLogger()
    before = (sys.stdout, sys.stderr, list(root.handlers), root.level)
    with RunConsole(tmp_path / "run.log") as console:
        with pytest.raises(KeyError):
            with console.capture():
                print("inside")
                raise KeyError("x")
    assert (sys.stdout, sys.stderr, list(root.handlers), root.level) == before
    assert "inside" in (tmp_path / "run.log").read_text()


def test_cache_hits_are_shown(tmp_path, capsys):
    with RunConsole(tmp_path / "run.log") as console:
        _run(talk_only, tmp_path / "kfp", console, caching=True)
        _run(talk_only, tmp_path / "kfp", console, caching=True)
    out = capsys.readouterr().out
    assert "talk#2: reused from the cache of an earlier run" in out  # the second execution
    assert [(t.label, t.status) for t in console.tasks] == [("talk", "done"), ("talk#2", "cached")]


def test_a_failed_run_rerun_into_the_same_folder_resumes_at_the_failed_task(tmp_path, capsys):
    """docs/operations.md, "Resuming a failed run": the finished tasks come from the cache."""
    from kfp import local

    flag = tmp_path / "fixed"
    with RunConsole(tmp_path / "run.log") as console:
        for attempt in range(2):
            local.init(runner=local.SubprocessRunner(use_venv=False),
                       pipeline_root=str(tmp_path / "kfp"), raise_on_error=True,
                       enable_caching=True)
            with console.capture():
                if attempt == 0:
                    with pytest.raises(RuntimeError, match="FAILURE"):
                        talk_then_check(n=3, fixed_flag=str(flag))
                    flag.touch()  # the cause is fixed (here: a file the task needs)
                else:
                    talk_then_check(n=3, fixed_flag=str(flag))
    assert [(t.label, t.status) for t in console.tasks] == [
        ("talk", "done"), ("fail-until-fixed", "failed"),
        ("talk#2", "cached"), ("fail-until-fixed#2", "done")]
    assert "talk#2: reused from the cache of an earlier run" in capsys.readouterr().out


def test_concurrent_workers_lines_go_to_their_own_task(tmp_path, capsys):
    """kfp.local runs ParallelFor workers two at a time, in threads: each line belongs to the
    task its thread started, and what kfp.local patches unlocked is put back afterwards."""
    import builtins

    print_before = builtins.print
    with RunConsole(tmp_path / "run.log") as console:
        _run(workers, tmp_path / "kfp", console)
    out = capsys.readouterr().out
    runs = [t for t in console.tasks if t.name == "slow-talk"]
    assert sorted(t.label for t in runs) == ["slow-talk", "slow-talk#2", "slow-talk#3"]
    said = {}
    for task in runs:
        lines = [line for line in task.tail if "item_embeddings.talk: worker says" in line]
        assert len(lines) == 1, (task.label, list(task.tail))
        n = lines[0].rsplit(" ", 1)[1]
        said[n] = task.label
        # (kfp.local's unlocked print patch can indent a worker's lines twice)
        assert f"worker {n} chatter" in [line.strip() for line in task.tail]
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(task.label)} \| worker says {n}$", out,
                         re.M)
    assert sorted(said) == ["1", "2", "3"]
    assert max(t.started for t in runs[:2]) < min(t.ended for t in runs[:2])  # they overlapped
    assert builtins.print is print_before
    assert re.search(r"^  slow-talk\s+done 3\s+\d+\.\d s$", "\n".join(
        summary_lines(console.tasks, tmp_path, {}, tmp_path / "run.log", 1.0, {})), re.M)


def test_parser_takes_step_records_in_the_progress_format(tmp_path, capsys):
    """The console finds a task's records by the item_embeddings log format (progress.py)."""
    record = logging.LogRecord("item_embeddings.x", logging.WARNING, __file__, 1,
                               "disk %s is full", ("sda",), None)
    line = logging.Formatter(LOG_FORMAT).format(record)
    ticks = iter([0.0, 0.0, 1.0, 3.5])
    with RunConsole(tmp_path / "run.log", clock=lambda: next(ticks)) as console:
        console.feed("12:00:00.000 - INFO - Executing task \x1b[96m'embed-x'\x1b[0m")
        console.feed("    " + line)
        console.feed("    [KFP Executor 2026-01-01 12:00:00,000 WARNING]: disk sda is full")
        console.feed("12:00:03.000 - INFO - Task \x1b[96m'embed-x'\x1b[0m finished with status "
                     "\x1b[92mSUCCESS\x1b[0m")
        console.feed("12:00:03.100 - INFO - Skipping conditional task condition-1 "
                     "(condition evaluated to False)")
    out = capsys.readouterr().out.splitlines()[1:]
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", s) for s in out] == [
        "embed-x: started", "embed-x | WARNING disk sda is full", "embed-x: done in 2.5 s",
        "condition-1: skipped (condition evaluated to False)"]


def test_meta_counts_reads_any_meta_file():
    meta = {"count": 1200, "k": 10, "attempted_count": 1000, "failed_count": 3,
            "failures_by_reason": {"timeout": 1, "http_status": 2}, "no_url_count": 200,
            "exact": True, "reused_count": 0, "wall_time_sec": 12.34, "flag_count": True}
    assert meta_counts(meta) == [
        "1,200 rows", "attempted 1,000", "failed 3", "failures by reason: http_status 2, timeout 1",
        "no url 200", "reused 0"]


def test_summary_lists_steps_counts_files_report_and_log(tmp_path):
    placed = {}
    for name, meta in [(KNN_META, {"count": 5, "wall_time_sec": 0.5}),
                       (IMG_META, {"count": 4, "failed_count": 30001,
                                          "failures_by_reason": {"http_status": 1,
                                                                 "host_unavailable": 30000},
                                          "unavailable_hosts": {"cdn.dead.example": 29990,
                                                                "127.0.0.2:8080": 10}}),
                       (TXT_META, {"count": 5})]:
        placed[name] = tmp_path / name
        placed[name].write_text(json.dumps(meta))
    placed[QA_REPORT] = tmp_path / QA_REPORT
    placed[QA_REPORT].write_text("<html></html>")
    tasks = [TaskRecord("embed-text", status="done", started=0.0, ended=6.25),
             TaskRecord("knn-graph", status="cached"),
             TaskRecord("worker", status="done", started=1.0, ended=3.0),  # two shard workers
             TaskRecord("worker", status="failed", started=2.0, ended=5.5)]
    lines = summary_lines(tasks, tmp_path, placed, tmp_path / "run.log", 42.0,
                          {"experiment runs": "/x/runs"})
    text = "\n".join(lines)
    assert f"local run finished in 42.0 s; outputs in {tmp_path}" in text
    assert re.search(r"embed-text\s+done\s+6\.2 s", text)
    assert re.search(r"knn-graph\s+cached$", text, re.M)
    assert re.search(r"worker\s+done 1, failed 1\s+4\.5 s$", text, re.M)  # first start to last end
    metas = [line.split()[0] for line in lines if line.startswith("  ") and "_meta" in line]
    assert metas == [TXT_META, IMG_META, KNN_META]  # steps' order first
    assert "failures by reason: host_unavailable 30,000, http_status 1" in text
    # the hosts whose breaker opened are named, with the images they cost
    assert re.search(r"^image hosts not answering \(circuit breaker opened.*retried by the next "
                     r"run\): cdn\.dead\.example \(29,990 images\),\s+127\.0\.0\.2:8080 "
                     r"\(10 images\)$", text, re.M | re.S)
    assert f"QA report: {tmp_path / QA_REPORT}" in lines
    assert lines[-2:] == ["experiment runs: /x/runs", f"full log: {tmp_path / 'run.log'}"]
    assert "QA report" not in "\n".join(summary_lines(
        tasks, tmp_path, {k: v for k, v in placed.items() if k != QA_REPORT},
        tmp_path / "run.log", 1.0, {}))


# --- the model hub probe: one bounded attempt, never the network in tests ---------------------

def test_hub_probe_is_one_attempt_at_the_endpoints_host(monkeypatch):
    calls = []

    def refused(address, timeout):
        calls.append((address, timeout))
        raise ConnectionRefusedError("no route")

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid:8443/")
    started = time.monotonic()
    assert runtime.hub_reachable(connect=refused, timeout_s=2.0) is False
    assert time.monotonic() - started < 1.0  # a quick refusal is not waited out
    assert calls == [(("hub.example.invalid", 8443), 2.0)]
    runtime.hub_reachable("http://mirror.invalid", connect=refused)
    assert calls[-1][0] == ("mirror.invalid", 80)


def test_hub_probe_gives_up_after_its_timeout():
    release = threading.Event()

    def hangs(address, timeout):  # a name lookup that never answers
        release.wait(10)
        raise OSError("late")

    started = time.monotonic()
    assert runtime.hub_reachable("https://hub.invalid", timeout_s=0.3, connect=hangs) is False
    assert time.monotonic() - started < 1.5
    release.set()


def test_hub_probe_true_when_the_host_answers():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert runtime.hub_reachable(f"http://127.0.0.1:{port}", timeout_s=2.0) is True


@pytest.mark.parametrize("settings, needed", [
    ({}, True),                                           # the open_clip tag 'openai'
    ({"image_pretrained": "none"}, False),                # packaged MiniLM, random image weights
    ({"image_pretrained": "/models/vit.pt"}, False),      # a checkpoint file
    ({"image_pretrained": "none",
      "text_model": "sentence-transformers/all-mpnet-base-v2"}, True),  # a text model on the hub
    ({"image_pretrained": "none", "text_model": "TMP"}, False),         # a local model folder
    ({"image_pretrained": "none", "text_model": "gs://b/models/minilm"}, False),
])
def test_the_hub_is_probed_when_a_step_downloads_from_it(settings, needed, tmp_path):
    from item_embeddings.config import PipelineParams
    from item_embeddings.ops.local_run import needs_model_hub

    if settings.get("text_model") == "TMP":
        settings = {**settings, "text_model": str(tmp_path)}
    assert needs_model_hub(PipelineParams(**settings)) is needed


def test_hub_offline_sets_and_restores_the_mode(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with runtime.hub_offline():
        assert constants.is_offline_mode()
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # what kfp.local's task processes inherit
    assert not constants.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ


@pytest.fixture
def hub_online_mode(monkeypatch, tmp_path):
    """huggingface_hub as on a user's machine: offline mode off (the suite turns it on), so only
    the code under test can keep it from the network; an empty model cache."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("ITEM_EMBEDDINGS_CACHE", str(tmp_path / "cache"))


def _unreachable_hub(monkeypatch) -> list:
    """The probe answers 'unreachable' without a connection; returns its calls' arguments."""
    probes = []

    def unreachable(*args, **kwargs) -> bool:
        probes.append(args)
        return False

    monkeypatch.setattr(runtime, "hub_reachable", unreachable)
    return probes


def test_demo_weights_fall_back_at_once_when_the_hub_is_unreachable(hub_online_mode, monkeypatch,
                                                                    tmp_path, capsys):
    import open_clip  # noqa: F401 - imported before the clock starts, as the CLI has by then

    from item_embeddings.config import PipelineParams
    from item_embeddings.ops.local_commands import _demo_image_weights
    from item_embeddings.ops.local_run import probe_hub

    probes = _unreachable_hub(monkeypatch)
    started = time.monotonic()
    with RunConsole(tmp_path / "run.log") as console:
        online = probe_hub(console)
        params = _demo_image_weights(PipelineParams(), console, online)
    took = time.monotonic() - started
    assert probes == [()] and params.image_pretrained == "none"
    assert took < 5  # huggingface_hub's retries alone take over 20 s per file
    out = capsys.readouterr().out
    assert "did not answer one 3 s connection attempt" in out
    assert "NOTE: open_clip weights 'openai' for 'ViT-B-32' cannot be found in the local cache" \
        in out and "RANDOM image weights" in out


def test_demo_weights_come_from_the_cache_when_the_hub_is_unreachable(hub_online_mode, tmp_path,
                                                                     capsys):
    from item_embeddings.config import PipelineParams
    from item_embeddings.ops.local_commands import _demo_image_weights

    repo = runtime.cache_dir() / "open_clip" / "models--timm--vit_base_patch32_clip_224.openai"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_model.safetensors").write_bytes(b"cached")
    with RunConsole(tmp_path / "run.log") as console:
        params = _demo_image_weights(PipelineParams(), console, hub_online=False)
    assert params.image_pretrained == "openai"
    assert "NOTE" not in capsys.readouterr().out


# --- the demo, whole, offline --------------------------------------------------------------

@pytest.mark.slow
def test_demo_offline_console_summary_and_log(hub_online_mode, monkeypatch, tmp_path, capfd):
    """The demo on a machine without the model hub: one probe, random weights said loudly, a
    short console (fd-level capture: nothing may bypass the console), a summary that agrees
    with the meta files, and the full output in run.log."""
    probes = _unreachable_hub(monkeypatch)
    out_dir = tmp_path / "demo"
    started = time.monotonic()
    rc = main(["demo", "--output-dir", str(out_dir), "--items-count", "8",
               "--set", "text_backend=torch", "--set", "fusion_epochs=2"])
    took = time.monotonic() - started
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    console = captured.out + captured.err
    check_console_of_a_run(console, out_dir)
    assert probes == [()]
    assert "RANDOM image weights" in console
    assert "embed-images | embed-image: 6/6 items (100.0%)" in console  # the step's progress
    assert "8 rows" in console and "no url 2" in console  # every 4th sample item has no image
    # the default knn_k (20) needs 21 items: the demo lowers it to what 8 items allow
    assert "knn_k lowered to 7 for 8 items" in console
    assert json.loads((out_dir / KNN_META).read_text())["k"] == 7
    assert took < 120


def test_demo_refuses_fewer_than_two_items_before_writing(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--items-count", "1"]) == 2
    assert "--items-count must be at least 2, got 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
