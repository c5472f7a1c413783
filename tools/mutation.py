"""Mutation testing of one module with that module's own tests (mutmut 3; docs/testing.md).

    tools/mutation.sh publish                                   # a name in mutation_targets.toml
    tools/mutation.sh src/item_embeddings/publish.py tests/test_publish.py
    tools/mutation.sh pipeline/pipeline.py tests/test_compile.py  # components/, pipeline/ too

mutmut imports the mutated copy of the code from ``mutants/src``, and names a mutant after the
file's path there. This repository installs ``components/`` and ``pipeline/`` as
``item_embeddings.components`` / ``item_embeddings.pipeline`` (pyproject's package-dir), so the
run happens in a stage, ``build/mutation/<name>/``, where the source tree has the installed
layout (``src/item_embeddings/{components,pipeline}``): import names, mutant names and the
tests' coverage then agree whatever module is mutated. The stage is a copy of the working tree
(tracked and untracked files), so uncommitted work is what gets tested.

Equivalent mutants (no test can tell them apart from the original) are listed in
``tools/mutation_equivalents.toml`` with a reason; a survivor that matches one counts as
equivalent, not as survived. The score is killed / (mutants - equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TARGETS_FILE = ROOT / "tools" / "mutation_targets.toml"
EQUIVALENTS_FILE = ROOT / "tools" / "mutation_equivalents.toml"
PACKAGE = "item_embeddings"
# pyproject's package-dir: where each installed package lives in the repository.
PACKAGE_DIRS = {"src/item_embeddings": f"src/{PACKAGE}",
                "components": f"src/{PACKAGE}/components",
                "pipeline": f"src/{PACKAGE}/pipeline"}
# Statuses mutmut gives a mutant that no test failed on; everything else is a kill.
NOT_KILLED = ("survived", "no tests", "skipped", "not checked", "check was interrupted by user")
# Each test process of a mutant gets its own pytest basetemp (two run at once).
BASETEMP_PLUGIN = '''"""pytest plugin of tools/mutation.py: one basetemp per test process, and
mutmut's test selection seeing through shared fixtures."""
import os
import shutil

import pytest

# mutmut's stats run gives a test the functions called between the previous test's teardown
# and its own: what a module- or session-scoped fixture calls (a template compiled once for a
# whole test file) would count for the first test using it only, and a mutant there would run
# that one test. Each test using the fixture is given the fixture's calls too.
_FIXTURE_CALLS = {}


def _collecting_stats():
    return os.environ.get("MUTANT_UNDER_TEST") == "stats"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.option.basetemp = os.path.join(os.environ["MUTATION_TMP"], f"p{os.getpid()}")


def pytest_unconfigure(config):
    shutil.rmtree(config.option.basetemp, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function" or not _collecting_stats():
        yield
        return
    from mutmut.state import state

    outer, state()._stats = state()._stats, set()
    try:
        yield
    finally:
        _FIXTURE_CALLS[fixturedef] = calls = state()._stats
        state()._stats = outer | calls


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    if not _collecting_stats():
        return
    from mutmut.state import state

    for fixturedefs in item._fixtureinfo.name2fixturedefs.values():
        for fixturedef in fixturedefs:
            state()._stats.update(_FIXTURE_CALLS.get(fixturedef, ()))
'''


class UsageError(Exception):
    """A bad command line or mapping: printed as one line, exit status 2."""


@dataclass
class Target:
    name: str
    source: str  # repository path of the module (a .py file or a package folder)
    tests: list[str]


@dataclass
class Outcome:
    target: Target
    statuses: dict[str, str]  # mutant name -> mutmut status
    diffs: dict[str, str] = field(default_factory=dict)  # not-killed mutant -> its diff
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant -> reason
    seconds: float = 0.0

    def count(self, *statuses: str) -> int:
        return sum(1 for s in self.statuses.values() if s in statuses)

    @property
    def survivors(self) -> list[str]:
        return sorted(m for m, s in self.statuses.items()
                      if s in NOT_KILLED and m not in self.equivalent)

    @property
    def killed(self) -> int:
        return sum(1 for s in self.statuses.values() if s not in NOT_KILLED)

    @property
    def score(self) -> float:
        relevant = len(self.statuses) - len(self.equivalent)
        return self.killed / relevant if relevant else 1.0


def load_targets() -> dict[str, Target]:
    data = tomllib.loads(TARGETS_FILE.read_text())
    return {name: Target(name, entry["module"], list(entry["tests"]))
            for name, entry in data.items()}


def resolve_target(spec: str, tests: list[str]) -> Target:
    """A name from the mapping, or a module path (then ``tests`` or the mapping's tests)."""
    targets = load_targets()
    if spec in targets:
        target = targets[spec]
        return Target(target.name, target.source, tests or target.tests)
    path = Path(spec)
    rel = (path.resolve().relative_to(ROOT) if path.is_absolute() or path.exists()
           else path).as_posix().rstrip("/")
    if not (ROOT / rel).exists():
        raise UsageError(f"{spec!r} is neither a module path nor a name in "
                         f"{TARGETS_FILE.relative_to(ROOT)} ({', '.join(sorted(targets))})")
    if not any(rel == d or rel.startswith(d + "/") for d in PACKAGE_DIRS):
        raise UsageError(f"{rel} is not under {', '.join(PACKAGE_DIRS)}")
    known = [t for t in targets.values() if t.source == rel]
    if not tests and not known:
        raise UsageError(f"no tests given for {rel} and none mapped in "
                         f"{TARGETS_FILE.relative_to(ROOT)}: name the test files after it")
    name = known[0].name if known else re.sub(r"[^A-Za-z0-9]+", "_", Path(rel).stem)
    return Target(name, rel, tests or known[0].tests)


def staged_path(rel: str) -> str:
    """Where a repository path lives in the stage (the installed layout)."""
    for repo_dir, staged in PACKAGE_DIRS.items():
        if rel == repo_dir or rel.startswith(repo_dir + "/"):
            return staged + rel[len(repo_dir):]
    return rel


def working_tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def build_stage(target: Target, stage: Path) -> None:
    """Copy the working tree into ``stage`` with the installed package layout under src/, and
    write the mutmut configuration for this one module and its tests."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for rel in working_tree_files():
        for dest in {rel, staged_path(rel)}:  # components/ also stays where tests look for it
            (stage / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, stage / dest)
    (stage / "_mutation_basetemp.py").write_text(BASETEMP_PLUGIN)
    mutated = staged_path(target.source)
    only = mutated if mutated.endswith(".py") else mutated + "/*"
    top_level = sorted(set(os.listdir(stage)) - {"src"})
    config = {
        "source_paths": ["src"],
        "only_mutate": [only],
        "also_copy": top_level,
        "pytest_add_cli_args": ["-p", "_mutation_basetemp", "-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": target.tests,
        # torch, grpc and threads in the tests: fork each mutant from a clean server process.
        "process_isolation": "forkserver",
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    pyproject = stage / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n".join(lines) + "\n")


def ensure_mutmut() -> None:
    """Install the pinned mutmut of pyproject's ``mutation`` extra when it is not there."""
    from importlib import metadata

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["mutation"]
    pin = next(r for r in extra if r.startswith("mutmut"))
    try:
        installed = metadata.version("mutmut")
    except metadata.PackageNotFoundError:
        installed = None
    if installed is None or f"=={installed}" not in pin:
        print(f"installing {pin} (pyproject's mutation extra; found {installed})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *extra], check=True)


def run_mutmut(stage: Path, jobs: int) -> None:
    env = dict(os.environ, MUTATION_TMP=str(stage / "tmp"))
    # kfp.local and CLI tests start Python processes: they import the mutated copy too.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(stage / "mutants" / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    (stage / "tmp").mkdir(exist_ok=True)
    # Before mutmut starts: Python never looks again into a sys.path folder that was missing
    # when it first searched it, and mutmut fills this one only after starting.
    (stage / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)]
    result = subprocess.run(cmd, cwd=stage, env=env)
    if result.returncode != 0:
        raise SystemExit(f"mutmut failed (exit status {result.returncode}); see its output above "
                         f"and {stage}")


def read_outcome(target: Target, stage: Path) -> Outcome:
    """The status of every mutant, and the diff of each one no test killed."""
    from mutmut.stats import status_by_exit_code

    statuses: dict[str, str] = {}
    for meta in sorted((stage / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        statuses.update({name: status_by_exit_code[code] for name, code in codes.items()})
    outcome = Outcome(target, statuses)
    cwd = os.getcwd()
    os.chdir(stage)  # mutmut reads its configuration and files relative to the stage
    try:
        from mutmut.configuration import reset_config
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        reset_config()  # read this stage's configuration, not one read before
        for name, status in statuses.items():
            if status in NOT_KILLED:
                outcome.diffs[name] = get_diff_for_mutant(name)
    finally:
        os.chdir(cwd)
    return outcome


def changed_lines(diff: str) -> str:
    """The removed and added lines of a mutant's diff, whitespace-stripped: what identifies a
    mutation across runs (mutant numbers shift when the module changes, this does not)."""
    return "\n".join(line[0] + line[1:].strip() for line in diff.splitlines()
                     if line[:1] in "+-" and not line.startswith(("---", "+++")))


def listed_lines(mutation: str) -> str:
    """The ``mutation`` of an equivalents entry (only -/+ lines, indented as you like) in the
    form of :func:`changed_lines`."""
    lines = [line.strip() for line in mutation.splitlines() if line.strip()]
    return "\n".join(line[0] + line[1:].strip() for line in lines if line[0] in "+-")


def import_name(rel: str) -> str:
    """``components/shared.py`` -> ``item_embeddings.components.shared``."""
    parts = Path(staged_path(rel)).with_suffix("").parts[1:]  # without "src"
    return ".".join(p for p in parts if p != "__init__")


def module_of(mutant: str) -> str:
    """``item_embeddings.publish.x_publish_outputs__mutmut_3`` -> ``item_embeddings.publish``."""
    parts = mutant.split(".")
    return ".".join(parts[:next(i for i, p in enumerate(parts) if p.startswith(("x_", "xǁ")))])


def function_of(mutant: str) -> str:
    """``item_embeddings.publish.xǁ_LocalTargetǁpublish__mutmut_3`` -> ``_LocalTarget.publish``."""
    mangled = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    if mangled.startswith("x_"):
        return mangled[2:]
    return mangled[2:].replace("ǁ", ".")  # "xǁClassǁmethod"


def load_equivalents() -> list[dict]:
    if not EQUIVALENTS_FILE.exists():
        return []
    entries = tomllib.loads(EQUIVALENTS_FILE.read_text()).get("equivalent", [])
    for entry in entries:
        missing = {"module", "function", "mutation", "reason"} - set(entry)
        if missing or not entry["reason"].strip() or entry["reason"].strip() == "TODO":
            raise UsageError(f"{EQUIVALENTS_FILE.relative_to(ROOT)}: every entry needs module, "
                             f"function, mutation and a reason; this one does not: {entry}")
    return entries


def mark_equivalents(outcome: Outcome) -> list[dict]:
    """Count the survivors listed as equivalent; return the module's entries that matched no
    survivor (a test kills it now, or the code changed: the entry can go)."""
    unused, target = [], outcome.target.source
    for entry in load_equivalents():
        if entry["module"] != target and not entry["module"].startswith(target + "/"):
            continue
        module = import_name(entry["module"])
        wanted, matched = listed_lines(entry["mutation"]), False
        for mutant, diff in outcome.diffs.items():
            if (module_of(mutant) == module and function_of(mutant) == entry["function"]
                    and changed_lines(diff) == wanted):
                outcome.equivalent[mutant] = entry["reason"].strip()
                matched = True
        if not matched:
            unused.append(entry)
    return unused


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    isa = "AVX-512 VNNI" if flags and "avx512_vnni" in flags.group(1).split() else "AVX2-only"
    return f"{model.group(1).strip() if model else 'unknown'}, {os.cpu_count()} cores, {isa}"


def report(outcome: Outcome, command: str, stage: Path) -> str:
    """The survivors with their diffs and a ready-to-fill equivalents entry, then the summary
    and the table row for docs/testing.md."""
    out = []
    for mutant in outcome.survivors:
        diff = outcome.diffs[mutant]
        out += [f"--- {outcome.statuses[mutant]}: {mutant}", diff, "",
                "    if no test can tell it from the original, add to "
                f"{EQUIVALENTS_FILE.relative_to(ROOT)}:",
                "    [[equivalent]]", f'    module = "{outcome.target.source}"',
                f'    function = "{function_of(mutant)}"',
                '    mutation = """', *("    " + ln for ln in changed_lines(diff).splitlines()),
                '"""', '    reason = "TODO: why no test can see it"', ""]
    for mutant, reason in sorted(outcome.equivalent.items()):
        out.append(f"equivalent: {mutant} ({reason})")
    total, killed = len(outcome.statuses), outcome.killed
    minutes, seconds = divmod(round(outcome.seconds), 60)
    timeouts = outcome.count("timeout")
    out += ["", f"{outcome.target.source}: {total} mutants, {killed} killed"
            + (f" ({timeouts} by timeout)" if timeouts else "")
            + f", {len(outcome.survivors)} survived"
            + (f" (of which {outcome.count('no tests')} reached by no test)"
               if outcome.count("no tests") else "")
            + f", {len(outcome.equivalent)} equivalent; score {outcome.score:.0%}"
            f" in {minutes} min {seconds:02d} s",
            f"tests: {' '.join(outcome.target.tests)}",
            f"stage (mutmut browse / mutmut show NAME there): {stage.relative_to(ROOT)}",
            "table row for docs/testing.md:",
            f"| `{outcome.target.source}` | {total} | {killed} | {len(outcome.survivors)} "
            f"| {len(outcome.equivalent)} | {outcome.score:.0%} | `{command}` "
            f"| {minutes} min {seconds:02d} s | {cpu_name()} |"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/mutation.sh", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n")[1].rstrip() + "\n\nnames: "
               + ", ".join(sorted(load_targets())) + " (tools/mutation_targets.toml); the "
               "report: build/mutation/NAME/report.txt; docs/testing.md says how to read it")
    parser.add_argument("module", help="a name of tools/mutation_targets.toml, or the path of a "
                        "module (or package folder) under src/item_embeddings, components or "
                        "pipeline")
    parser.add_argument("tests", nargs="*", help="test files or node ids (default: the mapping's)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutants tested at once (default: 2, or 1 on one core)")
    args = parser.parse_args(argv)
    try:
        target = resolve_target(args.module, args.tests)
        load_equivalents()  # a malformed file fails now, not after the run
    except UsageError as exc:
        parser.error(str(exc))
    command = " ".join(["tools/mutation.sh", args.module, *args.tests])
    stage = ROOT / "build" / "mutation" / target.name
    started = time.monotonic()
    ensure_mutmut()
    build_stage(target, stage)
    print(f"mutating {target.source} in {stage.relative_to(ROOT)}, tests: "
          f"{' '.join(target.tests)}", flush=True)
    run_mutmut(stage, args.jobs)
    outcome = read_outcome(target, stage)
    outcome.seconds = time.monotonic() - started
    unused = mark_equivalents(outcome)
    text = report(outcome, command, stage)
    if unused:
        text = "\n".join(
            [f"{EQUIVALENTS_FILE.relative_to(ROOT)}: {len(unused)} entries of this module "
             "matched no survivor (killed now, or the code changed): remove them", *(
                 f"  {e['function']}: {' / '.join(listed_lines(e['mutation']).splitlines())}"
                 for e in unused), "", text])
    (stage / "report.txt").write_text(text + "\n")
    (stage / "summary.json").write_text(json.dumps({
        "module": target.source, "tests": target.tests, "mutants": len(outcome.statuses),
        "killed": outcome.killed, "survived": len(outcome.survivors),
        "equivalent": len(outcome.equivalent), "score": round(outcome.score, 4),
        "seconds": round(outcome.seconds, 1), "cpu": cpu_name(), "command": command,
        "statuses": outcome.statuses}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
