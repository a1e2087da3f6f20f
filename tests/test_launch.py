"""Stage two on N nodes x M processes (CPU stand-ins: gloo, torchrun on localhost): the params must
describe the launcher's world, two nodes train what one process trains, gradient accumulation equals
a larger batch, and the Trainer options, strategies and loggers the params allow."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.errors import ParamsError
from pipeline.core.params import from_mapping
from pipeline.core.ranks import Ranks
from pipeline.student import launch
from pipeline.student.params import StudentParams
from tests.conftest import free_port, make_cached_workdir
from tests.test_distillation import CACHE, STAGE_STUDENT

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_cached_workdir(tmp_path_factory.mktemp("launch"), CACHE, train_per_task=16)


@pytest.mark.parametrize("env,devices,num_nodes,expected", [
    ({}, 1, 1, 1),
    ({}, "auto", 1, "auto"),  # no launcher: Lightning's own choice (1 CPU process, every GPU)
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"}, "auto", 2, 2),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"}, 2, 2, 2),
    ({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "train"}, "auto", 2, 4),
    ({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "bash"}, 3, 1, 3),  # an interactive allocation is no launcher
])
def test_devices_follow_the_launcher(env, devices, num_nodes, expected):
    assert launch.resolve_devices(devices, num_nodes, env) == expected


@pytest.mark.parametrize("env,devices,num_nodes,message", [
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}, 1, 1,
     r"student.devices: 1 x student.num_nodes 1 = 1 processes, but torchrun started WORLD_SIZE=2; set "
     r"student.devices: auto"),
    ({"SLURM_NTASKS": "4"}, 1, 2, r"= 2 processes, but srun started SLURM_NTASKS=4"),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "3"}, "auto", 2, r"num_nodes: 2 does not divide the 3 processes"),
    ({}, 1, 2, r"student.num_nodes: 2 nodes need a launcher"),
])
def test_a_world_the_params_do_not_describe_is_refused(env, devices, num_nodes, message):
    with pytest.raises(ParamsError, match=message):
        launch.resolve_devices(devices, num_nodes, env)


@pytest.mark.parametrize("env,expected", [
    ({}, Ranks()),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, Ranks(3, 4, 1)),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, Ranks()),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
     Ranks(2, 4, 0)),
])
def test_the_evaluation_takes_its_ranks_from_the_launcher(env, expected):
    assert Ranks.from_launcher(env) == expected


def test_srun_without_a_rendezvous_address_is_refused():
    with pytest.raises(ParamsError, match=r"srun started SLURM_NTASKS=2 but MASTER_ADDR and MASTER_PORT are not set"):
        Ranks.from_launcher({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


@pytest.mark.parametrize("key,value,message", [
    ("strategy", "fsdp", r"student.strategy: 'fsdp' is not supported: only auto and ddp are tested"),
    ("strategy", "deepspeed", r"'deepspeed' is not supported"),
    ("logger", "mlflow", r"student.logger: 'mlflow' is not one of dvclive, csv, tensorboard, wandb"),
    ("devices", 0, r"student.devices: must be >= 1 or auto"),
    ("devices", "all", r"student.devices"),
    ("accumulate_grad_batches", 0, r"student.accumulate_grad_batches"),
    ("num_nodes", 0, r"student.num_nodes"),
])
def test_trainer_options_are_checked_by_key(key, value, message):
    with pytest.raises(ParamsError, match=message):
        from_mapping(StudentParams, {key: value}, "params.yaml:student")


def test_a_logger_whose_package_is_absent_names_the_install(monkeypatch):
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ParamsError, match="student.logger: wandb needs the wandb package: pip install wandb"):
        launch.check_logger("wandb")
    launch.check_logger("csv")  # built into Lightning


def test_trainer_options_from_params():
    params = StudentParams(accumulate_grad_batches=4, log_every_n_steps=3, num_nodes=1, devices=1)
    options = launch.trainer_options(params, on_gpu=False, env={})
    assert options["accumulate_grad_batches"] == 4 and options["log_every_n_steps"] == 3
    assert options["num_nodes"] == 1 and options["precision"] == "32-true"


def ddp_distill(workdir, out, devices, batch, objective, num_nodes=1, accumulate=1, launcher=()):
    return [*launcher, str(ROOT / "tests" / "ddp_distill.py"), str(workdir), str(out), str(devices), str(batch), "3",
            objective, str(num_nodes), str(accumulate)]


def assert_same_soft_prompt(found: dict, expected: dict) -> None:
    for key in expected:
        assert torch.allclose(found[key], expected[key], atol=1e-5, rtol=1e-4), key


def test_two_nodes_under_torchrun_match_one_process(workdir, tmp_path):
    """torchrun --nnodes 2 --node-rank {0,1} on localhost, one process per node with 4 rows, devices
    auto: the soft prompt one process with 8 rows trains."""
    port = free_port()
    nodes = [subprocess.Popen(ddp_distill(workdir, tmp_path / "nodes", "auto", 4, "rollouts", num_nodes=2, launcher=(
        *TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
        "--master-port", str(port))), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    single = subprocess.run([sys.executable, *ddp_distill(workdir, tmp_path / "single", 1, 8, "rollouts")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    for rank in (0, 1):
        assert_same_soft_prompt(load_file(str(tmp_path / "nodes" / f"rank{rank}.safetensors")), expected)


def test_accumulating_two_batches_equals_one_batch_twice_the_size(workdir, tmp_path):
    """The rollout objective (latent selection among 3 draws included): 2 x 4 rows accumulated equal one
    step on 8 rows (one process each, in this one)."""
    from tests.ddp_distill import main as distill

    for batch, accumulate, out in ((4, 2, tmp_path / "accumulated"), (8, 1, tmp_path / "single")):
        distill(workdir, out, 1, batch, 3, "rollouts", accumulate=accumulate)
    assert_same_soft_prompt(load_file(str(tmp_path / "accumulated" / "rank0.safetensors")),
                            load_file(str(tmp_path / "single" / "rank0.safetensors")))


def test_the_stage_under_torchrun_with_too_few_devices_is_refused_on_every_rank(workdir, tmp_path):
    """torchrun --nproc-per-node 2 with the default devices: 1 used to train two independent copies
    (exit 0, no warning); now each rank stops with one line naming both numbers."""
    (workdir / "params.yaml").write_text(yaml.safe_dump({"student": STAGE_STUDENT, "cache": CACHE}))
    result = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()),
                             str(ROOT / "stages" / "train_student.py"), "--out", str(tmp_path / "s"), "--metrics",
                             str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c")],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    line = ("error: params.yaml:student.devices: 1 x student.num_nodes 1 = 1 processes, but torchrun started "
            "WORLD_SIZE=2; set student.devices: auto (what the launcher gave) or launch 1")
    assert result.stderr.count(line) == 2, result.stderr[-3000:]
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
