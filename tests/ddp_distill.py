"""Helper for test_distillation: train a few steps on a prepared workdir with N CPU processes and
save each rank's soft prompt, with the MeanFlow objective (``meanflow``), the rollout objective and
a latent (``rollouts``), the rollout objective on a code book with soft-EM selection (``posterior``), or
the policy objective with a latent (``policy``), distribution matching with its auxiliary (``matching``), or the
mean-field reverse KL with a latent and the greedy anchor (``mean_field``). Run as a script
(Lightning's DDP relaunches it for every rank), or under torchrun (``devices`` auto, ``num_nodes``), with the
stage's Trainer options (``pipeline.student.launch.trainer_options``).

The optimizer is plain SGD, not the stage's AdamW: what is compared is how DDP shards the batch and
averages gradients. Adam divides each gradient by its own running scale, so a gradient that is zero
up to rounding (which differs between a sum over 8 rows and two sums over 4, by CPU) becomes a step of
size lr in an arbitrary direction; SGD keeps a rounding difference a rounding difference."""

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from pipeline.cache.loader import TeacherCacheDataModule
from pipeline.data.layout import Layout
from pipeline.student.distillation import StudentDistillation
from pipeline.student.launch import trainer_options
from pipeline.student.model import Student
from pipeline.student.params import StudentParams
from pipeline.student.soft_prompt import SoftPromptConfig
from pipeline.teacher.artifact import load_teacher


class SGDDistillation(StudentDistillation):
    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=self.params.lr)


def main(workdir: Path, out: Path, devices: int | str, batch_size: int, steps: int, objective: str,
         num_nodes: int = 1, accumulate: int = 1) -> None:
    L.seed_everything(0)
    base, _, _ = load_teacher(workdir / "artifacts" / "teacher")
    rollouts = objective != "meanflow"
    options = {"meanflow": dict(meanflow_weight=1.0, rollout_weight=0.0),
               "rollouts": dict(),
               "posterior": dict(selection="posterior", selection_temperature=1.0, trained_draws=2),
               "policy": dict(rollout_weight=0.0, policy_weight=1.0, policy_samples=3),
               "matching": dict(rollout_weight=0.0, matching_weight=1.0, matching_warmup_steps=1),
               "mean_field": dict(rollout_weight=0.0, mean_field_weight=1.0, mean_field_samples=2)}[objective]
    prompt = SoftPromptConfig(prompt_length=2, hidden_size=8, latent_dim=4 if rollouts else 0,
                              codebook_size=5 if objective == "posterior" else 0)
    several = devices == "auto" or devices > 1 or num_nodes > 1
    params = StudentParams(soft_prompt=prompt, batch_size=batch_size, max_steps=steps, warmup_steps=1, lr=0.5,
                           latent_draws=3, devices=devices, num_nodes=num_nodes, strategy="ddp" if several else "auto",
                           accumulate_grad_batches=accumulate,
                           **{"meanflow_weight": 0.0, "rollout_weight": 1.0, **options})
    student = Student(base, config=params.soft_prompt)
    layout = Layout.load(workdir / "data")
    module = SGDDistillation(student, params, layout.gen_length, rollout_steps=layout.gen_length if rollouts else None,
                             eos_id=layout.pad_token_id)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_options(params, on_gpu=False))  # the stage's options
    data = TeacherCacheDataModule(workdir / "artifacts" / "cache", batch_size, shuffle=False, meanflow=not rollouts,
                                  rollouts="all" if rollouts else None)
    trainer.fit(module, datamodule=data)
    out.mkdir(parents=True, exist_ok=True)
    save_file(student.soft_prompt_state_dict(), str(out / f"rank{trainer.global_rank}.safetensors"))


if __name__ == "__main__":
    devices = sys.argv[3] if sys.argv[3] == "auto" else int(sys.argv[3])
    main(Path(sys.argv[1]), Path(sys.argv[2]), devices, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
         *map(int, sys.argv[7:9]))  # num_nodes, accumulate
