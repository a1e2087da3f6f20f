"""The whole pipeline as a new user runs it: the repository's dvc.yaml, stages and package copied into
a fresh git + DVC repository, micro params, ``dvc repro``, then ``dvc exp run -S``. And what dvc.yaml
declares: each stage's command-line paths and its code dependencies (the stage boundaries)."""

import ast
import copy
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare_data", "teacher", "cache_teacher", "train_student", "evaluate"]
MICRO = {
    "data": {"train_per_task": 24, "val_per_task": 2, "test_per_task": 2},
    "teacher": {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 48},
        "train": {"max_steps": 3, "batch_size": 16, "warmup_steps": 1},
    },
    "cache": {"samples_per_example": 1, "rows_per_shard": 64, "record_batch_rows": 16, "batch_size": 32},
    "student": {"max_steps": 3, "batch_size": 8, "eval_every": 2, "warmup_steps": 1, "soft_prompt": {"hidden_size": 8}},
    "evaluate": {"samples": 2, "batch_size": 16},
}


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def run(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com", "DVC_NO_ANALYTICS": "1"}
    command = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_dvc_repro_and_exp_run_in_a_fresh_repository(tmp_path):
    repo = fresh_repository(tmp_path / "repo", merged(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO))

    run(repo, "dvc", "repro")

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    for stage in ("prepare_data", "teacher", "cache_teacher", "train_student"):
        assert all(out.get("md5") for out in lock["stages"][stage]["outs"]), stage
    assert lock["stages"]["train_student"]["params"]["params.yaml"]["student"]["max_steps"] == 3
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status")

    # An edit reruns only the stages it can change.
    for module, expected in (("student/soft_prompt.py", {"train_student", "evaluate"}),
                             ("student/params.py", {"train_student"}),  # evaluate reruns when the student changes
                             ("evaluation/params.py", {"evaluate"}), ("evaluation/grid.py", {"evaluate"}),
                             ("evaluation/report.py", {"evaluate"}), ("cache/loader.py", {"train_student"})):
        path = repo / "pipeline" / module
        original = path.read_text()
        path.write_text(original + "# an edit\n")
        assert set(json.loads(run(repo, "dvc", "status", "--json"))) == expected, module
        path.write_text(original)
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status")

    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    settings = evaluation["settings"]
    assert {f"teacher_steps{n}_greedy" for n in (1, 2, 4, 7)} | {"student_steps1_greedy", "student_steps1_greedy_cfg0.5",
                                                                   "student_steps1_sampled_t1x2"} <= set(settings)
    assert settings["student_steps1_greedy"]["forward_passes"] == 1
    assert settings["student_steps1_greedy_cfg0.5"]["forward_passes"] == 2
    assert settings["teacher_steps7_greedy"]["forward_passes"] == 7
    assert set(settings["teacher_steps7_greedy"]["accuracy"]) == {"add", "sort", "perm", "word", "mean"}
    assert evaluation["student_speedup_vs_teacher_gen_length"] > 0
    assert (repo / "metrics" / "eval" / "accuracy_vs_forward_passes.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student | 1 | 0 |" in (repo / "metrics" / "eval" / "results.md").read_text()

    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert "metrics/eval.json" in json.dumps(metrics)
    plots = json.loads(run(repo, "dvc", "plots", "show", "--json"))["data"]
    assert {"accuracy_vs_forward_passes", "metrics/eval/accuracy_vs_forward_passes.png"} <= set(plots)

    # An experiment changes one value; only the stages that read it rerun.
    out = run(repo, "dvc", "exp", "run", "-S", "student.max_steps=2")
    assert "Running stage 'train_student'" in out and "Running stage 'teacher'" not in out
    assert json.loads((repo / "metrics" / "student" / "summary.json").read_text())["steps"] == 2
    shown = run(repo, "dvc", "exp", "show", "--json")
    assert '"max_steps": 2' in shown.replace(" ", "").replace('":', '": ')


SLOW_SHARDS = """
import os, time
if os.environ.get("SLOW_SHARD_SECONDS"):  # a test hook: each stage-one shard takes this long to close
    from pipeline.cache import shards
    close = shards.ShardWriter.close
    shards.ShardWriter.close = lambda self: time.sleep(float(os.environ["SLOW_SHARD_SECONDS"])) or close(self)
"""


def fresh_repository(path: Path, params: dict) -> Path:
    """The repository's dvc.yaml, stages and package in a new git + DVC repository with ``params``."""
    path.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(path, "git", "init", "-q")
    run(path, "dvc", "init", "-q")
    run(path, "dvc", "config", "core.analytics", "false")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "pipeline")
    return path


def test_a_killed_dvc_repro_of_stage_one_resumes_to_the_uninterrupted_cache(tmp_path):
    """dvc repro used to delete the cache before rerunning stage one (no persist), so a preempted run
    started over. Now: SIGTERM to dvc repro mid-way, dvc repro again; the complete shards are kept
    (the same files) and the cache equals one built without interruption, byte for byte."""
    params = merged(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    params["cache"].update(rows_per_shard=8, rollouts={**params["cache"]["rollouts"], "per_example": 0})
    repo = fresh_repository(tmp_path / "repo", params)
    run(repo, "dvc", "repro", "teacher")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SHARDS)
    env = {**os.environ, "PYTHONPATH": str(hook), "SLOW_SHARD_SECONDS": "1", "DVC_NO_ANALYTICS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "cache_teacher"], cwd=repo, env=env,
                               start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = repo / "artifacts" / "cache"
    deadline = time.monotonic() + 300
    while len(list(cache.glob("shard-*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode != 0
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("shard-*.arrow")
            if p.with_suffix(".json").is_file()}
    total = json.loads((cache / "manifest.json").read_text())["num_shards"]
    assert total == 12 and 3 <= len(kept) < total
    run(repo, "dvc", "repro", "cache_teacher")
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status", "cache_teacher")
    after = {name: ((cache / name).stat().st_ino, (cache / name).stat().st_mtime_ns) for name in kept}
    assert after == kept  # written once, before the kill
    run(repo, sys.executable, "stages/cache_teacher.py", "--out", str(tmp_path / "whole"), "--metrics",
        str(tmp_path / "whole.json"))
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "whole").iterdir()) and len(names) == 2 * 12 + 1
    for name in names:
        assert (cache / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def module_file(dotted: str) -> Path | None:
    """The repository file of a ``pipeline`` module (``None`` for a package: their ``__init__.py``
    files are empty, which ``test_subpackage_init_files_are_empty`` checks)."""
    path = Path(*dotted.split("."))
    return path.with_suffix(".py") if (ROOT / path.with_suffix(".py")).is_file() else None


def pipeline_imports(path: Path) -> set[str]:
    """``pipeline`` modules a file imports (as repository paths), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:  # a name of the module, or a submodule
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {str(file) for name in names if name.startswith("pipeline.") and (file := module_file(name))}
    return found


def closure(path: str) -> set[str]:
    """The ``pipeline`` modules ``path`` imports, directly or not (``pipeline/core/stage.py`` included: it
    pins the CPU arithmetic, which decides the bits of every output)."""
    needed, todo = set(), pipeline_imports(ROOT / path)
    while todo:
        module = todo.pop()
        if module not in needed:
            needed.add(module)
            todo |= pipeline_imports(ROOT / module)
    return needed


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_modules_it_imports():
    """So that editing a module reruns every stage whose outputs it can change, and no other."""
    for name, stage in dvc_stages().items():
        assert f"stages/{name}.py" in stage["deps"], name
        listed = {dep for dep in stage["deps"] if dep.startswith("pipeline/") and dep.endswith(".py")}
        needed = closure(f"stages/{name}.py")
        assert not needed - listed, f"stage {name} does not list {sorted(needed - listed)}"
        assert not listed - needed, f"stage {name} lists {sorted(listed - needed)}, which it does not import"


def under(folder: str, modules: set[str]) -> set[str]:
    return {m for m in modules if m.startswith(f"pipeline/{folder}/")}


def test_stage_boundaries():
    """A rule over folders, so a new module joins its side by where it lives: an edit under
    ``pipeline/student/`` or ``pipeline/evaluation/`` never reruns the teacher or the cache (hours of GPU
    time on LLaDA-8B), the teacher stage reads nothing of the cache, only the evaluation reads its own
    folder, and the sampler takes any mask predictor (no student)."""
    stage = {name: closure(f"stages/{name}.py") for name in STAGES}
    for name in ("prepare_data", "teacher", "cache_teacher"):
        for folder in ("student", "evaluation"):
            assert not under(folder, stage[name]), f"{name} imports {sorted(under(folder, stage[name]))}"
    for name in ("prepare_data", "teacher"):
        assert not under("cache", stage[name]), f"{name} imports {sorted(under('cache', stage[name]))}"
    assert under("teacher", stage["prepare_data"]) == {"pipeline/teacher/params.py"}  # it reads teacher.checkpoint
    assert [name for name in STAGES if under("evaluation", stage[name])] == ["evaluate"]
    assert "pipeline/teacher/pretraining.py" not in stage["train_student"] | stage["evaluate"]
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")}
    for module in modules - under("evaluation", modules):
        assert not under("evaluation", closure(module)), f"{module} imports the evaluation"
    for module in under("generation", modules) | under("models", modules) | under("core", modules):
        assert not under("student", closure(module)), f"{module} imports the student"


def test_subpackage_init_files_are_empty():
    """Re-exports would put a whole folder in every importer's DVC closure, and hide it from the
    closure test (which reads the modules a file names)."""
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        assert init.read_text() == "", init


def test_stage_commands_pass_every_path_and_the_scripts_default_to_them():
    """dvc.yaml is where the paths are declared: each stage's command passes every path option of its
    script, with the script's default value (so ``python stages/x.py`` runs the same stage), and each
    path is a declared dependency or output (or a directory holding declared ones)."""
    undeclared = {Path("checkpoints/student"), Path("logs/student")}  # resume state and other loggers' files
    dvc_only = {"cache_teacher": {"replace_other": True}}  # the output directory is DVC's (persist: true)
    for name, stage in dvc_stages().items():
        command = shlex.split(stage["cmd"])
        assert command[:2] == ["python", f"stages/{name}.py"], name
        spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        passed, defaults = vars(script.parse_args(command[2:])), vars(script.parse_args([]))
        assert passed == {**defaults, **dvc_only.get(name, {})}, name
        paths = {value for value in passed.values() if isinstance(value, Path)}
        assert {f"--{key.replace('_', '-')}" for key, value in passed.items() if isinstance(value, Path)} <= set(command)
        declared = [Path(next(iter(entry)) if isinstance(entry, dict) else entry)
                    for key in ("deps", "outs", "metrics", "plots") for entry in stage.get(key, [])]
        for path in paths - undeclared:
            assert any(path == d or path in d.parents for d in declared), f"{name}: {path} is not declared"
