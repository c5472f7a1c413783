"""The compiled Vertex template: DAG edges, fan-out, machines, Spot, identity, caching and
parameters — read back from the YAML, and the custom jobs built as GCPC's launcher builds them."""

import inspect
import json
import re
from pathlib import Path
from typing import NamedTuple

import google.auth
import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform_v1.services.job_service import JobServiceClient
from google.cloud.aiplatform_v1.types import custom_job as gca_custom_job
from google.cloud.aiplatform_v1.types import job_state
from google_cloud_pipeline_components.container.v1.custom_job import remote_runner

from item_embeddings.config import PARAM_FIELDS, PipelineParams, param_description
from item_embeddings.pipeline import compile_pipeline

IMAGE = "europe-docker.pkg.dev/proj/repo/item-embeddings:1.2.3"
GPU_IMAGE = "europe-docker.pkg.dev/proj/repo/item-embeddings-gpu:1.2.3"
SA = "runner@proj.iam.gserviceaccount.com"
NETWORK = "projects/123/global/networks/vpc"
KEY = "projects/proj/locations/europe-west4/keyRings/r/cryptoKeys/k"
ROOT = "gs://bucket/pipeline-root"


# Each target is compiled once for the whole file (a second apiece): the tests read the same
# template, and a mutation run of pipeline/pipeline.py stays short per mutant.
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    # the default target (Vertex), written into folders that do not exist yet
    path = tmp_path_factory.mktemp("tpl") / "new" / "folder" / "item_embeddings.yaml"
    compile_pipeline(path, image=IMAGE, gpu_image=GPU_IMAGE, pipeline_root=ROOT)
    return path, yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def local_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "local.yaml"
    compile_pipeline(path, target="local", image=IMAGE)
    return path, yaml.safe_load(path.read_text())


@pytest.fixture(params=["vertex", "local"])
def either_template(request, template, local_template):
    """The spec of each target, and the target."""
    return {"vertex": template, "local": local_template}[request.param][1], request.param


def _root(spec):
    return spec["root"]["dag"]["tasks"]


def _component(spec, task):
    return spec["components"][task["componentRef"]["name"]]


def _loop(spec, task: str = "embed-images"):
    """The workers' loop that runs ``task`` and the tasks inside it (in the root DAG on
    Vertex; locally inside the loop's own small pipeline)."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    for dag in dags:
        for name in (k for k in dag["tasks"] if k.startswith("for-loop")):
            loop = dag["tasks"][name]
            inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
            if task in inner:
                return loop, inner
    raise KeyError(task)


def _output(task: str, key: str) -> dict:
    return {"taskOutputParameter": {"outputParameterKey": key, "producerTask": task}}


class Branch(NamedTuple):
    """One branch of the text workers (Vertex): the If/Else task, the text-workers pipeline
    task inside it, that pipeline's loop and the worker task in the loop."""

    condition: dict
    workers: dict
    loop: dict
    embed: dict


def _text_branches(spec) -> dict[str, Branch]:
    """The text workers' branches by name ('text-on-cpu', 'text-on-gpu')."""
    (branches,) = [t for k, t in _root(spec).items() if k.startswith("condition-branches")]
    found = {}
    for condition in _component(spec, branches)["dag"]["tasks"].values():
        (workers,) = _component(spec, condition)["dag"]["tasks"].values()
        (loop,) = _component(spec, workers)["dag"]["tasks"].values()
        (embed,) = _component(spec, loop)["dag"]["tasks"].values()
        found[condition["taskInfo"]["name"]] = Branch(condition, workers, loop, embed)
    return found


def _branch_taken(condition: str, values: dict) -> bool:
    """Evaluate a branch's trigger condition as the backend does, for the simple form the
    compiler writes here: ``[!(]inputs.parameter_values['pipelinechannel--x'] == ''[)]``."""
    match = re.fullmatch(r"(!\()?inputs\.parameter_values\['pipelinechannel--([a-z_]+)'\] == "
                         r"'([^']*)'(\))?", condition)
    assert match, condition
    negated, name, literal, _ = match.groups()
    return (values[name] == literal) != bool(negated)


def _producers(task: dict) -> set[str]:
    return {a["taskOutputArtifact"]["producerTask"]
            for a in task.get("inputs", {}).get("artifacts", {}).values()
            if "taskOutputArtifact" in a}


def test_dag_edges(template):
    _, spec = template
    tasks = _root(spec)
    assert tasks["importer"]["inputs"]["parameters"]["uri"] == {
        "componentInputParameter": "items_uri"}
    assert _producers(tasks["fingerprint-inputs"]) == {"importer"}
    # The loops' widths are decided at run time: the first task plans min(shards with work,
    # max_parallel_shards) workers per step from the pipeline parameters (KFP's own
    # ParallelFor parallelism is a compile-time constant, so it is left unset).
    for name in ("shards", "max_parallel_shards", "max_items"):
        assert tasks["fingerprint-inputs"]["inputs"]["parameters"][name] == {
            "componentInputParameter": name}
    fuse = tasks["fuse-embeddings"]["inputs"]
    loop, inner = _loop(spec, "embed-images")
    # the image loop runs one worker per item of its own list of the plan: only the workers
    # that have images to embed
    assert loop["parameterIterator"]["items"] == {
        "inputParameter": "pipelinechannel--fingerprint-inputs-image_workers"}
    assert loop["taskInfo"]["name"] == "image-workers"
    assert "parallelismLimit" not in loop.get("iteratorPolicy", {})
    assert set(inner) == {"embed-images"}
    assert inner["embed-images"]["inputs"]["parameters"]["worker"] == {
        "componentInputParameter": "pipelinechannel--fingerprint-inputs-image_workers-loop-item"}
    # the text workers: a pipeline per branch, looping over the plan's workers the same way
    for branch in _text_branches(spec).values():
        assert branch.workers["inputs"]["parameters"]["workers"] == {
            "componentInputParameter": "pipelinechannel--fingerprint-inputs-workers"}
        assert branch.workers["inputs"]["artifacts"]["items"] == {
            "componentInputArtifact": "pipelinechannel--importer-artifact"}
        assert branch.loop["parameterIterator"]["items"] == {
            "inputParameter": "pipelinechannel--workers"}
        assert branch.loop["taskInfo"]["name"] == "text-workers"
        assert "parallelismLimit" not in branch.loop.get("iteratorPolicy", {})
        assert branch.embed["inputs"]["parameters"]["worker"] == {
            "componentInputParameter": "pipelinechannel--workers-loop-item"}
    # fusion collects the loops' outputs (it merges them; the text's from the branch that
    # ran) and gets each loop's plan
    images = fuse["artifacts"]["image_shards"]["taskOutputArtifact"]
    assert images["producerTask"].startswith("for-loop")
    text = fuse["artifacts"]["text_shards"]["taskOutputArtifact"]
    assert text["producerTask"].startswith("condition-branches")
    assert "-oneof-" in text["outputArtifactKey"]
    for key in ("workers", "image_workers", "previous_set"):
        assert fuse["parameters"][key] == _output("fingerprint-inputs", key)
    assert _producers(tasks["knn-graphs"]) == {"fuse-embeddings"}
    assert _producers(tasks["qa-report"]) == {"importer", "fuse-embeddings", "knn-graphs"}
    # no task of its own to merge or to publish: the report publishes; the only condition is
    # the text workers' choice of job
    assert not {"merge-text", "merge-images", "plan-shards", "publish-outputs"} & set(tasks)
    assert [name for name in tasks if name.startswith("condition")] == [
        text["producerTask"]]
    assert tasks["qa-report"]["inputs"]["parameters"]["publish_uri"] == {
        "componentInputParameter": "publish_uri"}


def _tasks_in_a_row(spec) -> list[str]:
    """The longest chain of root tasks, each waiting for the one before (the importer left
    out: it starts no worker machine of the path)."""
    tasks = _root(spec)
    skip = {"importer"}

    def chain(name):
        before = [chain(d) for d in tasks[name].get("dependentTasks", []) if d not in skip]
        return max(before, key=len, default=[]) + [name]

    return max((chain(name) for name in tasks if name not in skip), key=len)


def test_five_tasks_in_a_row_one_per_role(template):
    """Issue 23.4: fingerprint and plan are one task, the merges run in the fusion task and
    publishing in the report task, so the critical path starts five machines one after
    another: plan, the workers (text and image side by side), fusion, kNN, report."""
    _, spec = template
    chain = _tasks_in_a_row(spec)
    assert len(chain) == 5, chain
    assert chain[0] == "fingerprint-inputs"
    assert chain[1].startswith(("for-loop", "condition-branches"))
    assert chain[2:] == ["fuse-embeddings", "knn-graphs", "qa-report"]
    # the text workers' branches and the image loop stand side by side after the first task
    for name, task in _root(spec).items():
        if name.startswith(("for-loop", "condition-branches")):
            assert set(task["dependentTasks"]) - {"importer"} == {"fingerprint-inputs"}, name


def test_the_first_task_gets_the_machine_parameters(template):
    """The never-cached first task checks the machine pairing of a UI rerun (each job sees
    only its own machine), so it takes every machine parameter by name."""
    _, spec = template
    bound = _root(spec)["fingerprint-inputs"]["inputs"]["parameters"]
    for name in ("text_machine_type", "text_accelerator", "image_machine_type",
                 "fusion_machine_type", "knn_machine_type"):
        assert bound[name] == {"componentInputParameter": name}, name
    # every other task waits for it: the workers and fusion take its plan
    for name, task in _root(spec).items():
        if name.startswith(("for-loop", "condition-branches")) or name == "fuse-embeddings":
            assert "fingerprint-inputs" in task["dependentTasks"], name


def test_steps_reading_items_are_cached_by_content(template):
    """The first task (fingerprint and plan) is never cached; the steps that read the items or
    the previous set take its fingerprint, so changed contents are a cache miss there. The
    report, which publishes, is never cached either."""
    _, spec = template
    tasks = _root(spec)
    assert tasks["fingerprint-inputs"]["cachingOptions"] == {}  # = enableCache false
    assert tasks["qa-report"]["cachingOptions"] == {}
    for name in ("fuse-embeddings", "knn-graphs"):
        assert tasks[name]["inputs"]["parameters"]["inputs_fingerprint"] == _output(
            "fingerprint-inputs", "fingerprint"), name
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
    # the workers get it in their loop item, from the plan
    _, inner = _loop(spec, "embed-images")
    workers = [inner["embed-images"], *(b.embed for b in _text_branches(spec).values())]
    assert len(workers) == 3
    for task in workers:
        assert "inputs_fingerprint" not in task["inputs"]["parameters"]


def test_every_worker_is_a_custom_job_with_its_machine_from_parameters(template):
    _, spec = template
    _, inner = _loop(spec, "embed-images")
    _, text_loop = _loop(spec, "embed-text")
    inner = {**inner, **text_loop}
    images = inner["embed-images"]["inputs"]["parameters"]
    assert images["strategy"] == {"componentInputParameter": "pipelinechannel--image_strategy"}
    (pool,) = images["worker_pool_specs"]["runtimeValue"]["constant"]
    assert pool["machine_spec"] == {
        "machine_type": "{{$.inputs.parameters['pipelinechannel--image_machine_type']}}",
        "accelerator_type": "NVIDIA_TESLA_T4", "accelerator_count": 1}
    assert pool["container_spec"]["image_uri"] == GPU_IMAGE
    assert inner["embed-images"]["retryPolicy"]["maxRetryCount"] >= 3
    branches = _text_branches(spec)
    assert set(branches) == {"text-on-cpu", "text-on-gpu"}
    for name, gpu in (("text-on-cpu", False), ("text-on-gpu", True)):
        text = branches[name].embed["inputs"]["parameters"]
        assert text["strategy"] == {"componentInputParameter": "pipelinechannel--text_strategy"}
        (pool,) = text["worker_pool_specs"]["runtimeValue"]["constant"]
        assert pool["machine_spec"] == {
            "machine_type": "{{$.inputs.parameters['pipelinechannel--text_machine_type']}}",
            "accelerator_type": ("{{$.inputs.parameters['pipelinechannel--text_accelerator']}}"
                                 if gpu else ""),
            "accelerator_count": 1 if gpu else 0}, name
        assert pool["container_spec"]["image_uri"] == (GPU_IMAGE if gpu else IMAGE), name
        assert branches[name].embed["retryPolicy"]["maxRetryCount"] >= 3, name
    for task, param in [("fuse-embeddings", "fusion_machine_type"),
                        ("knn-graphs", "knn_machine_type")]:
        job = _root(spec)[task]
        (pool,) = job["inputs"]["parameters"]["worker_pool_specs"]["runtimeValue"]["constant"]
        assert pool["machine_spec"]["machine_type"] == \
            f"{{{{$.inputs.parameters['pipelinechannel--{param}']}}}}", task
        assert pool["container_spec"]["image_uri"] == IMAGE
        assert job["retryPolicy"]["maxRetryCount"] >= 1, task


def _custom_jobs(spec) -> dict[str, list]:
    """Every task of the template (in any DAG) with a ``worker_pool_specs`` input, by its
    component's name, with that input's value."""
    jobs = {}
    for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values()
                                       if "dag" in c)]:
        for task in dag["tasks"].values():
            spec_input = task.get("inputs", {}).get("parameters", {}).get("worker_pool_specs")
            if spec_input is not None:
                jobs[task["componentRef"]["name"]] = spec_input
    return jobs


def test_no_custom_job_takes_its_image_or_gpu_count_from_a_task(template):
    """Vertex substitutes placeholders in a job's ``machine_spec`` (kubeflow/pipelines#10883);
    one elsewhere in the same structure was seen left as it was (#11504), and a count given
    as a string is refused by the API. So every job's image is a constant of the template, its
    GPU count an integer, and what is filled in at run time is a pipeline parameter, never
    another task's output."""
    path, spec = template
    jobs = _custom_jobs(spec)
    # the first task, text on CPU, text on GPU, images, fusion, kNN, the report
    assert len(jobs) == 7 and "text-machine" not in path.read_text()
    for name, value in jobs.items():
        assert set(value) == {"runtimeValue"}, name  # a constant, not a task's output
        (pool,) = value["runtimeValue"]["constant"]
        assert pool["container_spec"]["image_uri"] in (IMAGE, GPU_IMAGE), name
        # a number (the spec's constants are protobuf Struct values: doubles, 1.0), never a
        # string such as a placeholder: the payload then holds 0 or 1, not "0"
        count = pool["machine_spec"]["accelerator_count"]
        assert type(count) in (int, float) and count in (0, 1), name
        filled = re.findall(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", json.dumps(pool))
        assert {f.removeprefix("pipelinechannel--") for f in filled} <= {
            "text_machine_type", "text_accelerator", "image_machine_type",
            "fusion_machine_type", "knn_machine_type"}, (name, filled)
        # the first task and the report: the small machine, a constant
        assert filled or pool["machine_spec"]["machine_type"] == "e2-standard-4", name
    gpu_jobs = [n for n, v in jobs.items()
                if v["runtimeValue"]["constant"][0]["machine_spec"]["accelerator_count"] == 1]
    assert sorted(gpu_jobs) == ["comp-embed-images", "comp-embed-text-2"]


def test_text_accelerator_picks_the_text_branch_and_the_merge_takes_it(template):
    """Exactly one branch runs for any ``text_accelerator``: the CPU job when it is empty,
    the GPU job otherwise; the merge's input is the output of whichever ran (``dsl.OneOf``),
    each being its text workers' collected shards."""
    _, spec = template
    branches = _text_branches(spec)
    for accelerator in ("", "NVIDIA_TESLA_T4", "NVIDIA_L4"):
        taken = [name for name, branch in branches.items() if _branch_taken(
            branch.condition["triggerPolicy"]["condition"], {"text_accelerator": accelerator})]
        assert taken == ["text-on-gpu" if accelerator else "text-on-cpu"], accelerator
    (key,) = [k for k in _root(spec) if k.startswith("condition-branches")]
    oneof = _component(spec, _root(spec)[key])["dag"]["outputs"]["artifacts"]
    merged = _root(spec)["fuse-embeddings"]["inputs"]["artifacts"]["text_shards"]
    assert merged == {"taskOutputArtifact": {"producerTask": key,
                                             "outputArtifactKey": next(iter(oneof))}}
    (selectors,) = [v["artifactSelectors"] for v in oneof.values()]
    conditions = _component(spec, _root(spec)[key])["dag"]["tasks"]
    assert sorted(conditions[s["producerSubtask"]]["taskInfo"]["name"] for s in selectors) == [
        "text-on-cpu", "text-on-gpu"]
    for selector in selectors:
        branch = branches[conditions[selector["producerSubtask"]]["taskInfo"]["name"]]
        # the condition's output is its text-workers pipeline's, which collects its loop's
        condition = _component(spec, branch.condition)["dag"]
        (workers_key,) = condition["tasks"]
        ((output_key, output),) = condition["outputs"]["artifacts"].items()
        assert selector["outputArtifactKey"] == output_key
        assert output["artifactSelectors"] == [{"outputArtifactKey": "Output",
                                                "producerSubtask": workers_key}]
        (out,) = _component(spec, branch.workers)["dag"]["outputs"]["artifacts"].values()
        loop_key = out["artifactSelectors"][0]["producerSubtask"]
        assert _component(spec, branch.workers)["dag"]["tasks"][loop_key] == branch.loop
        assert _component(spec, branch.workers)["outputDefinitions"]["artifacts"]["Output"][
            "isArtifactList"] is True
        (collected,) = _component(spec, branch.loop)["dag"]["outputs"]["artifacts"].values()
        assert collected["artifactSelectors"] == [{"outputArtifactKey": "text_shards",
                                                   "producerSubtask": "embed-text"}]


def test_the_first_task_and_the_report_are_custom_jobs_on_a_small_machine(template):
    """No plain task is left on the path: the first task and the report run as custom jobs
    too (so a persistent resource serves them as well), on an e2-standard-4, in the CPU image,
    nothing pip-installed at start."""
    _, spec = template
    executors = spec["deploymentSpec"]["executors"]
    for name in ("fingerprint-inputs", "qa-report"):
        task = _root(spec)[name]
        (pool,) = task["inputs"]["parameters"]["worker_pool_specs"]["runtimeValue"]["constant"]
        assert pool["machine_spec"] == {"machine_type": "e2-standard-4",
                                        "accelerator_type": "", "accelerator_count": 0}, name
        assert pool["container_spec"]["image_uri"] == IMAGE, name
        assert not any("pip install" in c for c in pool["container_spec"]["command"]
                       + pool["container_spec"]["args"])
        assert task["retryPolicy"]["maxRetryCount"] == 2, name
    assert "exec-merge-text" not in executors and "exec-plan-shards" not in executors


def test_parameters_and_defaults(template):
    _, spec = template
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(PARAM_FIELDS)
    defaults = PipelineParams()
    for name, field in PARAM_FIELDS.items():
        got = params[name].get("defaultValue")
        want = getattr(defaults, name)
        assert got == want, name
        assert params[name]["description"] == param_description(name)
        assert params[name]["description"].startswith(field.metadata["help"])
    assert params["fusion_batch_size"]["description"].endswith("Allowed: >= 2 and <= 8192.")
    assert params["max_parallel_shards"]["description"].endswith("Allowed: >= 1 and <= 100.")


def test_project_and_location_come_from_runtime_placeholders(template):
    _, spec = template
    merge = _root(spec)["fuse-embeddings"]["inputs"]["parameters"]
    assert merge["project"]["runtimeValue"]["constant"] == "{{$.pipeline_google_cloud_project_id}}"
    assert merge["location"]["runtimeValue"]["constant"] == "{{$.pipeline_google_cloud_location}}"


def test_vertex_accepts_the_template_offline(template):
    path, _ = template
    job = aiplatform.PipelineJob(
        display_name="item-embeddings-test", template_path=str(path),
        pipeline_root="gs://bucket/root", project="proj", location="europe-west4",
        credentials=AnonymousCredentials(),
        parameter_values={"items_uri": "gs://bucket/items/", "max_items": 5000,
                          "image_strategy": "STANDARD", "fusion_lr": 0.002, "shards": 8,
                          "text_machine_type": "c3-standard-8",
                          "allow_private_hosts": False})
    runtime = job.runtime_config.parameter_values
    assert runtime["items_uri"] == "gs://bucket/items/" and runtime["max_items"] == 5000
    assert runtime["shards"] == 8 and runtime["text_machine_type"] == "c3-standard-8"
    with pytest.raises(ValueError):
        aiplatform.PipelineJob(display_name="x", template_path=str(path), project="proj",
                               location="europe-west4", credentials=AnonymousCredentials(),
                               pipeline_root="gs://bucket/root",
                               parameter_values={"no_such_param": 1})


def test_local_target_has_no_custom_job(local_template):
    path, spec = local_template
    assert "custom_job" not in path.read_text()
    _, inner = _loop(spec, "embed-images")
    assert "strategy" not in inner["embed-images"]["inputs"]["parameters"]
    # kfp.local cannot select an artifact from If/Else branches (dsl.OneOf): one plain loop of
    # text workers, feeding fusion (which merges) directly
    assert not any(k.startswith("condition-branches") for k in _root(spec))
    workers = _root(spec)["text-workers"]
    (loop,) = _component(spec, workers)["dag"]["tasks"].values()
    (embed,) = _component(spec, loop)["dag"]["tasks"].values()
    assert "strategy" not in embed["inputs"]["parameters"]
    assert _root(spec)["fuse-embeddings"]["inputs"]["artifacts"]["text_shards"] == {
        "taskOutputArtifact": {"producerTask": "text-workers", "outputArtifactKey": "Output"}}


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target"):
        compile_pipeline("x.yaml", target="k8s")


# Vertex-only knobs, ignored by kfp.local (documented): the machines and scheduling of the jobs.
VERTEX_ONLY = {"image_strategy", "text_strategy", "text_machine_type", "image_machine_type",
               "fusion_machine_type", "knn_machine_type", "persistent_resource_id"}


def test_every_parameter_reaches_a_task(either_template):
    """No knob is silently ignored: each pipeline parameter feeds some task (or the importer)."""
    spec, target = either_template
    used = set()

    def walk(dag):
        for task in dag.get("tasks", {}).values():
            for value in task.get("inputs", {}).get("parameters", {}).values():
                used.add(value.get("componentInputParameter"))
                used.update(re.findall(r"pipelinechannel--([a-z_]+)'", json.dumps(value)))
            condition = task.get("triggerPolicy", {}).get("condition", "")
            used.update(name for name in PARAM_FIELDS if f"parameters['{name}']" in condition)

    walk(spec["root"]["dag"])
    for comp in spec["components"].values():
        walk(comp.get("dag", {}))
    used = {u.removeprefix("pipelinechannel--") for u in used if u}
    unused = set(PARAM_FIELDS) - used
    if target == "local":
        unused -= VERTEX_ONLY
    assert unused == set()



def test_every_input_named_like_a_parameter_is_bound_to_it(either_template):
    """In every task (the loop's and the condition's included), each component input that has
    a pipeline parameter's name takes that parameter: an input left unbound would silently run
    with its default whatever the run sets."""
    spec, _ = either_template
    checked, wrong = 0, []

    def walk(dag):
        nonlocal checked
        for name, task in dag.get("tasks", {}).items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:  # a loop, condition or pipeline: check the tasks inside
                walk(component["dag"])  # (a pipeline's own inputs are checked below)
            bound = task.get("inputs", {}).get("parameters", {})
            for param in component.get("inputDefinitions", {}).get("parameters", {}):
                if param not in PARAM_FIELDS:
                    continue
                checked += 1
                source = bound.get(param, {}).get("componentInputParameter", "")
                if source.removeprefix("pipelinechannel--") != param:
                    wrong.append(f"{name}.{param}: {bound.get(param)}")

    walk(spec["root"]["dag"])
    assert wrong == []
    assert checked >= 60  # every step's parameter inputs were seen (not an empty walk)


def test_a_parameter_is_never_passed_by_hand():
    """The pipeline binds parameters by name only: passing one explicitly is refused."""
    from item_embeddings.components.fingerprint_inputs import make_component
    from item_embeddings.pipeline.pipeline import _bind

    with pytest.raises(TypeError, match=r"bound by name, not passed: \['shards'\]"):
        _bind(make_component(IMAGE), {name: None for name in PARAM_FIELDS}, shards=3)

def _resolve(template_text: str, values: dict) -> str:
    """Fill ``{{$.inputs.parameters['x']}}`` as the KFP backend does: strings as they are,
    everything else as JSON (the spec stores numbers as doubles; integral ones are written
    without a fraction, as the backend's JSON does)."""

    def plain(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    def value(match):
        v = values[match.group(1)]
        return v if isinstance(v, str) else json.dumps(plain(v))

    return re.sub(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", value, template_text)


def _resolve_nested(value, values):
    """Placeholders inside a list/dict constant, as Vertex's backend resolves them: a string
    that is exactly one placeholder becomes the parameter's typed value (an int stays an int;
    kubeflow/pipelines#10883 runs accelerator_count this way), others are substituted as text."""
    if isinstance(value, list):
        return [_resolve_nested(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_nested(v, values) for k, v in value.items()}
    if isinstance(value, str):
        whole = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", value)
        return values[whole.group(1)] if whole else _resolve(value, values)
    return value


def _launch(spec, task, component_name, values, runtime, monkeypatch, tmp_path):
    """The CustomJob GCPC's launcher creates for ``task`` (the job's payload filled in with
    ``values``, then Vertex's runtime placeholders with ``runtime``)."""
    comp = spec["components"][component_name]
    executor = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    filled = {k: v.get("defaultValue") for k, v in comp["inputDefinitions"]["parameters"].items()}
    for name, binding in task["inputs"]["parameters"].items():
        if "runtimeValue" in binding:  # a constant, maybe holding placeholders of its own
            filled[name] = _resolve_nested(binding["runtimeValue"]["constant"], values)
        else:
            filled[name] = values[name]
    payload = _resolve(executor["args"][executor["args"].index("--payload") + 1], filled)
    for placeholder, resolved in runtime.items():
        payload = payload.replace(placeholder, resolved)
    created = []

    def create_custom_job(self, parent, custom_job, **_):
        created.append(gca_custom_job.CustomJob(custom_job))  # validates against the proto
        return gca_custom_job.CustomJob(name=f"{parent}/customJobs/1")

    def get_custom_job(self, name, **_):
        return gca_custom_job.CustomJob(name=name, state=job_state.JobState.JOB_STATE_SUCCEEDED)

    monkeypatch.setattr(JobServiceClient, "create_custom_job", create_custom_job)
    monkeypatch.setattr(JobServiceClient, "get_custom_job", get_custom_job)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "p"))
    remote_runner.create_custom_job(type="CustomJob", project="proj", location="europe-west4",
                                    payload=payload, gcp_resources=str(tmp_path / "res.json"))
    (job,) = created
    return job


def _runtime(configured: bool) -> dict:
    return {"{{$.pipeline_service_account}}": SA if configured else "",
            "{{$.pipeline_network}}": NETWORK if configured else "",
            "{{$.pipeline_encryption_key_name}}": KEY if configured else "",
            "{{$.pipeline_persistent_resource_id}}": ""}


def _task_values(spec, task, overrides=None) -> dict:
    """What the backend would feed ``task``: pipeline defaults (+ overrides) for the loop's
    pipeline channels, made-up values for other tasks' outputs."""
    defaults = {k: v.get("defaultValue") for k, v in
                spec["root"]["inputDefinitions"]["parameters"].items()}
    defaults.update(overrides or {})
    values = {}
    for name, binding in task["inputs"]["parameters"].items():
        source = binding.get("componentInputParameter", "")
        key = source.removeprefix("pipelinechannel--")
        values[name] = defaults.get(key, "0123abcd")
        values[f"pipelinechannel--{name}"] = values[name]
    for key, value in defaults.items():
        values[f"pipelinechannel--{key}"] = value
    return values


@pytest.mark.parametrize("configured", [True, False])
def test_t4_job_runs_as_the_pipelines_identity_in_its_network(template, monkeypatch, tmp_path,
                                                               configured):
    """The image workers' CustomJob, with the pipeline's runtime placeholders resolved as
    Vertex resolves them (empty when the run sets none)."""
    _, spec = template
    _, inner = _loop(spec, "embed-images")
    task = inner["embed-images"]
    job = _launch(spec, task, task["componentRef"]["name"], _task_values(spec, task),
                  _runtime(configured), monkeypatch, tmp_path)
    assert job.job_spec.service_account == (SA if configured else "")
    assert job.job_spec.network == (NETWORK if configured else "")
    assert job.encryption_spec.kms_key_name == (KEY if configured else "")
    assert job.job_spec.scheduling.strategy.name == "SPOT"
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.machine_spec.machine_type == "n1-standard-4"
    assert pool.machine_spec.accelerator_type.name == "NVIDIA_TESLA_T4"
    assert pool.container_spec.image_uri == GPU_IMAGE
    assert task["inputs"]["parameters"]["require_gpu"] == {"runtimeValue": {"constant": True}}


@pytest.mark.parametrize("accelerator,machine", [("", "n1-standard-8"),
                                                 ("NVIDIA_TESLA_T4", "n1-standard-8"),
                                                 ("NVIDIA_L4", "g2-standard-8")])
def test_text_workers_get_the_machine_a_rerun_asks_for(template, monkeypatch, tmp_path,
                                                       accelerator, machine):
    """A UI rerun's text_machine_type / text_accelerator reach the text workers' CustomJob
    of the branch the backend runs for them: with a GPU, one of it in the GPU image; without,
    none in the slim CPU image."""
    _, spec = template
    values = {"text_accelerator": accelerator}
    (branch,) = [b for b in _text_branches(spec).values()
                 if _branch_taken(b.condition["triggerPolicy"]["condition"], values)]
    task = branch.embed
    values = _task_values(spec, task, {"text_machine_type": machine,
                                       "text_accelerator": accelerator,
                                       "text_strategy": "STANDARD"})
    job = _launch(spec, task, task["componentRef"]["name"], values, _runtime(True),
                  monkeypatch, tmp_path)
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.machine_spec.machine_type == machine
    assert pool.machine_spec.accelerator_count == (1 if accelerator else 0)
    assert pool.machine_spec.accelerator_type.name == (accelerator or
                                                       "ACCELERATOR_TYPE_UNSPECIFIED")
    assert pool.container_spec.image_uri == (GPU_IMAGE if accelerator else IMAGE)
    assert job.job_spec.scheduling.strategy.name == "STANDARD"
    assert job.job_spec.service_account == SA and job.job_spec.network == NETWORK
    # the worker in the job is told about its GPU (it fails at once if torch cannot use it)
    assert task["inputs"]["parameters"]["text_accelerator"] == {
        "componentInputParameter": "pipelinechannel--text_accelerator"}


@pytest.mark.parametrize("task_name,param", [("fuse-embeddings", "fusion_machine_type"),
                                             ("knn-graphs", "knn_machine_type")])
def test_cpu_steps_get_the_machine_a_rerun_asks_for(template, monkeypatch, tmp_path, task_name,
                                                    param):
    """fusion_machine_type / knn_machine_type of a UI rerun reach the step's CustomJob (a 10M
    catalogue's kNN graphs need a high-memory machine), which runs as the pipeline's identity."""
    _, spec = template
    task = _root(spec)[task_name]
    values = _task_values(spec, task, {param: "e2-highmem-16"})
    job = _launch(spec, task, task["componentRef"]["name"], values, _runtime(True),
                  monkeypatch, tmp_path)
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.machine_spec.machine_type == "e2-highmem-16"
    assert pool.machine_spec.accelerator_count == 0
    assert pool.container_spec.image_uri == IMAGE
    assert job.job_spec.service_account == SA and job.job_spec.network == NETWORK


@pytest.mark.parametrize("resource", ["", "warm-pool-1"])
def test_every_job_runs_on_the_persistent_resource_a_run_names(template, monkeypatch, tmp_path,
                                                               resource):
    """persistent_resource_id (a pipeline parameter: a UI rerun or a schedule can set it)
    reaches the CustomJob of every task, as GCPC's launcher builds it: the first task, both
    workers, fusion, kNN and the report run on the warm machines; empty = started on demand."""
    _, spec = template
    tasks = _job_tasks(spec)
    assert len(tasks) == 7
    for name, task in tasks.items():
        values = _task_values(spec, task, {"persistent_resource_id": resource})
        (tmp_path / name).mkdir()  # a fresh gcp_resources file: the launcher creates a job
        job = _launch(spec, task, task["componentRef"]["name"], values, _runtime(True),
                      monkeypatch, tmp_path / name)
        assert job.job_spec.persistent_resource_id == resource, name
        assert job.job_spec.service_account == SA, name  # the job keeps the pipeline's identity


def _job_tasks(spec) -> dict[str, dict]:
    """The task of each custom job: the first task, both text workers, the image worker,
    fusion, kNN and the report."""
    tasks = {name: _root(spec)[name]
             for name in ("fingerprint-inputs", "fuse-embeddings", "knn-graphs", "qa-report")}
    tasks["embed-images"] = _loop(spec, "embed-images")[1]["embed-images"]
    tasks.update({f"embed-text ({name})": branch.embed
                  for name, branch in _text_branches(spec).items()})
    return tasks


def test_every_job_is_named_after_its_step_and_stopped_after_a_day(template, monkeypatch,
                                                                    tmp_path):
    """The CustomJob each task starts, as the console's list of custom jobs shows it: named
    after its step, and stopped by Vertex after 24 hours (not GCPC's 7 days: a stuck worker
    on a GPU costs a day at most)."""
    import datetime as dt

    _, spec = template
    for name, task in _job_tasks(spec).items():
        (tmp_path / name).mkdir()
        job = _launch(spec, task, task["componentRef"]["name"], _task_values(spec, task),
                      _runtime(True), monkeypatch, tmp_path / name)
        assert job.display_name == name.partition(" ")[0], name
        assert job.job_spec.scheduling.timeout == dt.timedelta(hours=24), name


def _run_graph(spec, dag=None, path=()) -> dict[str, tuple]:
    """Every task of the template (in loops, conditions and the workers' pipelines too) by the
    path of display names the run's graph shows, with its retry policy and caching option."""
    found = {}
    for task in (spec["root"]["dag"] if dag is None else dag)["tasks"].values():
        # the branches' group has no display name of its own: the compiler numbers it
        key = (*path, re.sub(r"^condition-branches-\d+$", "condition-branches",
                             task["taskInfo"]["name"]))
        found["/".join(key)] = (task.get("retryPolicy"), task.get("cachingOptions"))
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            found.update(_run_graph(spec, component["dag"], key))
    return found


def _retries(count: int, backoff: str) -> dict:
    """A compiled retry policy (KFP's own backoff factor and cap)."""
    return {"maxRetryCount": count, "backoffDuration": backoff, "backoffFactor": 2.0,
            "backoffMaxDuration": "3600s"}


CACHED = {"enableCache": True}
NOT_CACHED = {}  # what the compiler writes for enableCache false


def test_each_task_as_the_run_graph_shows_it(template, local_template):
    """The names a user reads in the run's graph, and each task's retries and caching: on
    Vertex the workers retry five times a minute apart (Spot preemptions; a retried worker
    resumes from its finished shards), the steps twice at once (transient failures); the
    first task and the report (it publishes) are never cached. Locally nothing is retried
    (a failure is a bug to see at once), and caching is the same."""
    workers = _retries(5, "60s")
    steps = _retries(2, "0s")
    expected = {
        "Items": (None, CACHED), "Fingerprint and plan": (steps, NOT_CACHED),
        "image-workers": (None, None), "image-workers/Embed images": (workers, CACHED),
        "condition-branches": (None, None),
        "Fuse embeddings": (steps, CACHED), "kNN graphs": (steps, CACHED),
        "QA report": (steps, NOT_CACHED)}
    for branch, label in (("text-on-cpu", "CPU"), ("text-on-gpu", "GPU")):
        # each branch runs its text workers' pipeline, which holds their loop
        workers_pipeline = f"condition-branches/{branch}/Text workers ({label})"
        expected |= {f"condition-branches/{branch}": (None, None),
                     workers_pipeline: (None, CACHED),
                     f"{workers_pipeline}/text-workers": (None, None),
                     f"{workers_pipeline}/text-workers/Embed text": (workers, CACHED)}
    assert _run_graph(template[1]) == expected
    assert _run_graph(local_template[1]) == {
        "Items": (None, CACHED), "Fingerprint and plan": (None, NOT_CACHED),
        "Text workers": (None, CACHED), "Text workers/text-workers": (None, None),
        "Text workers/text-workers/Embed text": (None, CACHED),
        "Image workers": (None, CACHED), "Image workers/image-workers": (None, None),
        "Image workers/image-workers/Embed images": (None, CACHED),
        "Fuse embeddings": (None, CACHED), "kNN graphs": (None, CACHED),
        "QA report": (None, NOT_CACHED)}


def test_parameter_types_and_the_runs_outputs(either_template):
    """Each parameter has its PipelineParams type (what the Vertex UI's form accepts), and a
    run lists its five outputs, each from the task that writes it."""
    spec, _ = either_template
    kinds = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: p["parameterType"] for name, p in params.items()} == {
        name: kinds[type(field.default)] for name, field in PARAM_FIELDS.items()}
    outputs = spec["root"]["dag"]["outputs"]["artifacts"]
    assert {name: out["artifactSelectors"] for name, out in outputs.items()} == {
        name: [{"outputArtifactKey": key, "producerSubtask": task}]
        for name, task, key in [("text_embeddings", "fuse-embeddings", "text_embeddings"),
                                ("image_embeddings", "fuse-embeddings", "image_embeddings"),
                                ("fused_embeddings", "fuse-embeddings", "fused_embeddings"),
                                ("knn_graphs", "knn-graphs", "graphs"),
                                ("report", "qa-report", "report")]}
    assert set(spec["root"]["outputDefinitions"]["artifacts"]) == set(outputs)


COMPONENTS = ("embed_images", "embed_text", "fingerprint_inputs", "fuse_embeddings",
              "knn_graphs", "qa_report")


@pytest.mark.parametrize("name", COMPONENTS)
def test_a_component_compiles_with_the_pipelines_defaults_and_help(name, tmp_path):
    """A component used on its own (compiled, or called through ``python_func``): every input
    named like a pipeline parameter has PipelineParams' default and help, every runtime input
    its own, in the image given, nothing pip-installed. The module is executed afresh, as a new
    process imports it (its inputs are completed when it is imported)."""
    import importlib.util

    from kfp import compiler

    from item_embeddings.components import shared

    source = Path(shared.__file__).parent / name / "component.py"
    module_spec = importlib.util.spec_from_file_location(f"fresh_{name}", source)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    component = module.make_component(IMAGE)
    path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(component, str(path))
    spec = yaml.safe_load(path.read_text())
    (executor,) = spec["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == IMAGE
    assert not any("pip install" in c for c in executor["container"]["command"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = PipelineParams()
    want = {n: (getattr(defaults, n), param_description(n)) for n in params if n in PARAM_FIELDS}
    want |= {n: shared.RUNTIME_INPUTS[n] for n in params if n in shared.RUNTIME_INPUTS}
    assert {n: (p.get("defaultValue"), p["description"]) for n, p in params.items()} == want
    function = component.python_func
    signature = inspect.signature(function)
    assert {n: q.default for n, q in signature.parameters.items() if n in want} == {
        n: default for n, (default, _) in want.items()}
    assert len(want) >= 5  # (the parameters of each component were seen)


def test_the_template_names_the_pipeline_its_purpose_and_its_root(template):
    """What the Vertex AI console shows of a pipeline before any run: its name, its description
    and the default root of its runs' artifacts (the compile option)."""
    _, spec = template
    assert spec["pipelineInfo"] == {
        "name": "item-embeddings",
        "description": "Multimodal item embeddings: text, image and fused vectors for every "
                       "item, their kNN graphs and a QA report."}
    assert spec["defaultPipelineRoot"] == ROOT


def _runtime_constants(spec, dag=None) -> dict[str, dict]:
    """The constant run-time inputs (project, location, run id, require_gpu) of each task that
    has any, by its task name."""
    found = {}
    for name, task in (spec["root"]["dag"] if dag is None else dag)["tasks"].items():
        bound = task.get("inputs", {}).get("parameters", {})
        constants = {k: bound[k]["runtimeValue"]["constant"] for k in
                     ("project", "location", "run_id", "require_gpu") if k in bound}
        if constants:
            found[name] = constants
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            found.update(_runtime_constants(spec, component["dag"]))
    return found


def test_run_time_inputs_of_each_target(either_template):
    """On Vertex the steps that log experiment runs get the run's project and location (the
    runtime placeholders) and the image worker must find its GPU; locally they get none (the
    local store) and no GPU is required. The report reads the run's name either way."""
    spec, target = either_template
    if target == "vertex":
        where = {"project": "{{$.pipeline_google_cloud_project_id}}",
                 "location": "{{$.pipeline_google_cloud_location}}"}
    else:
        where = {"project": "", "location": ""}
    assert _runtime_constants(spec) == {
        "fuse-embeddings": where, "knn-graphs": where, "embed-text": where,
        "embed-images": {**where, "require_gpu": target == "vertex"},
        "qa-report": {"run_id": "{{$.pipeline_job_name}}"}}


def test_pipeline_inputs_completes_a_functions_defaults_and_help():
    """What a new component gets from ``@pipeline_inputs``: its parameter inputs' defaults, and
    their help at the end of its Args section (before Returns, after which KFP reads no input's
    help; a function without a docstring gets the section); an input that is neither a pipeline
    parameter nor a runtime input is refused by name."""
    from kfp.dsl import Dataset, Input

    from item_embeddings.components.shared import RUNTIME_INPUTS, pipeline_inputs

    seed = f"    seed: {param_description('seed')}"
    run_id = f"    run_id: {RUNTIME_INPUTS['run_id'][1]}"

    def answer(items: Input[Dataset], seed: int, run_id: str) -> str:
        """Answers.

        Args:
            items: The items.

        Returns:
            The answer.
        """

    def quiet(items: Input[Dataset], seed: int, run_id: str):
        """Says nothing.

        Args:
            items: The items.
        """

    def bare(seed: int, run_id: str):
        pass

    assert pipeline_inputs(answer).__defaults__ == (PipelineParams().seed, "")
    assert answer.__doc__ == "\n".join(["Answers.", "", "Args:", "    items: The items.", seed,
                                        run_id, "Returns:", "    The answer.", ""])
    assert pipeline_inputs(quiet).__doc__ == "\n".join(
        ["Says nothing.", "", "Args:", "    items: The items.", seed, run_id, ""])
    assert pipeline_inputs(bare).__doc__ == "\n".join(["Args:", seed, run_id, ""])

    def stray(items: Input[Dataset], seed: int, colour: str):
        """Paints."""

    with pytest.raises(TypeError) as refused:
        pipeline_inputs(stray)
    assert str(refused.value) == ("stray: input 'colour' is neither an artifact (those come "
                                  "first) nor a pipeline parameter nor a runtime input")

