"""The two images' build recipe, read as text (no Docker here): what each image installs, that
the GPU image is CUDA 12.x, that baked weights mean no hub at run time, and that Cloud Build
builds and pushes exactly those images."""

import ast
import fnmatch
import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile(name: str) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("torch=="))


def _python_snippets(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines for m in re.finditer(r'python -c "([^"]+)"', line)]


def test_cpu_image_has_no_cuda_and_bakes_the_text_models():
    lines = _dockerfile("Dockerfile")
    torch_install = next(line for line in lines if "pip install torch==" in line)
    assert _torch_pin() in torch_install
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install
    assert not any("cu12" in line or "nvidia" in line.lower() for line in lines)
    bake = next(i for i, line in enumerate(lines) if "load_text_encoder" in line)
    offline = next(i for i, line in enumerate(lines) if "HF_HUB_OFFLINE=1" in line)
    assert offline > bake  # downloads (if any) happen at build time, never at run time
    assert "onnx" in lines[bake]  # the exact default backend's model is built in


def test_gpu_image_is_cuda_12_for_the_t4_and_bakes_clip():
    lines = _dockerfile("Dockerfile.gpu")
    default_cuda = next(line for line in lines if line.startswith("ARG TORCH_CUDA="))
    assert re.fullmatch(r"ARG TORCH_CUDA=cu12\d", default_cuda)
    torch_install = next(line for line in lines if "pip install torch==" in line)
    assert _torch_pin() in torch_install
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in torch_install
    # the build refuses a wheel that is not CUDA 12.x or lacks T4 kernels
    assert "startswith('12.')" in torch_install and "sm_75" in torch_install
    bake = next(i for i, line in enumerate(lines) if "prefetch_pretrained" in line)
    offline = next(i for i, line in enumerate(lines) if "HF_HUB_OFFLINE=1" in line)
    assert offline > bake


def test_the_bake_snippets_use_real_apis():
    """The images run these at build time: they must at least parse and name what exists."""
    import importlib

    for name in ("Dockerfile", "Dockerfile.gpu"):
        for snippet in _python_snippets(_dockerfile(name)):
            tree = ast.parse(snippet)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("item_embeddings"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), (name, node.module, alias.name)


def test_cloud_build_builds_and_pushes_both_images():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    tags, dockerfiles = [], []
    for step in build["steps"]:
        args = step["args"]
        assert args[0] == "build"
        dockerfiles.append(args[args.index("-f") + 1])
        tags.append(args[args.index("-t") + 1])
    assert sorted(dockerfiles) == ["Dockerfile", "Dockerfile.gpu"]
    assert all((ROOT / d).is_file() for d in dockerfiles)
    assert sorted(build["images"]) == sorted(tags)  # every built image is pushed
    assert {t.rsplit("/", 1)[1].split(":")[0] for t in tags} == {"item-embeddings",
                                                                  "item-embeddings-gpu"}
    assert "_TORCH_CUDA" in build["substitutions"]
    # tagged with the commit: the cache key of a Vertex task holds the image URI, so a moving
    # tag rebuilt with new code would be served the old code's cached results
    assert all(t.endswith(":${SHORT_SHA}") for t in tags), tags
    assert not any(k in build["substitutions"] for k in ("_TAG", "SHORT_SHA"))


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copied = set()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        for line in _dockerfile(name):
            if line.startswith("COPY "):
                copied.update(line.split()[1:-1])
    assert copied == {"pyproject.toml", "README.md", "src", "components", "pipeline"}
    for path in copied:
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), path
    for path in (".git", "tests", "bench"):
        assert any(fnmatch.fnmatch(path, p) for p in patterns), path
