"""Shared fixtures: generated item catalogues (tests never read ../shared), and the network
guard: no test, and no process a test starts, reaches an address outside loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import network_guard
from helpers import TINY_CONFIG, catalogue, free_port, write_items

# Keep test processes (and kfp.local subprocesses, which inherit the environment) off the network
# and from oversubscribing the two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["pytester"]  # test_network_guard runs a test session of its own

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="session", autouse=True)
def network_guard_log(tmp_path_factory):
    """Install the network guard for the session, here and (via PYTHONPATH) in subprocesses."""
    log = tmp_path_factory.getbasetemp() / "network-refusals.log"
    log.touch()
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR / "network_guard_site")] + ([old_path] if old_path else []))
    uninstall = network_guard.install(str(log))
    yield log
    uninstall()
    os.environ.pop(network_guard.LOG_ENV, None)
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


@pytest.fixture(autouse=True)
def no_network(network_guard_log):
    """Fail a test that tried to reach the network outside loopback, even if the code under test
    caught the refusal (tests that provoke one on purpose take it with ``take_refusals``)."""
    yield
    refused = network_guard.take_refusals()
    if refused:
        pytest.fail("this test tried to leave the machine:\n" + "\n".join(refused),
                    pytrace=False)


@pytest.fixture
def items_path(tmp_path: Path) -> Path:
    return write_items(tmp_path / "items.parquet", catalogue(40))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny ViT open_clip config (a JSON file, as ``image_model`` accepts) and a checkpoint."""
    import json

    import open_clip
    import torch

    root = tmp_path_factory.mktemp("tiny_model")
    config = root / "tiny-vit-test.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-test")
    checkpoint = root / "tiny-vit-test.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint, model.state_dict()


@pytest.fixture(scope="session")
def gcs_emulator_host():
    """A real GCS JSON API (gcp-storage-emulator) on 127.0.0.1, stopped by pid at the end."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start",
                             "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:  # bounded: at most 30 s of readiness polls
            try:
                urllib.request.urlopen(f"{host}/storage/v1/b", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator did not start") from None
                time.sleep(0.2)
        yield host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def gcs(gcs_emulator_host, monkeypatch):
    """A storage client against the emulator, with STORAGE_EMULATOR_HOST set for the code under
    test."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_host)
    from item_embeddings.storage import gcs_client

    return gcs_client()


# The ops tests' in-memory Vertex AI and Artifact Registry (tests/vertex_fake.py); imported when
# used, so that a session without ops tests does not load the aiplatform SDK.
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """A real compiled KFP template with the pipeline's name and some of its parameters."""
    from vertex_fake import compile_template

    return compile_template(tmp_path_factory.mktemp("tpl") / "item_embeddings.yaml")


@pytest.fixture
def fake(monkeypatch):
    """An in-memory Vertex AI behind the aiplatform SDK's GAPIC clients."""
    from vertex_fake import install_fake_vertex, uninstall_fake_vertex

    yield install_fake_vertex(monkeypatch)
    uninstall_fake_vertex()


@pytest.fixture
def registry(monkeypatch):
    """Artifact Registry's KFP upload API at ``requests``' HTTP adapter; records requests."""
    from vertex_fake import install_fake_registry

    return install_fake_registry(monkeypatch)
