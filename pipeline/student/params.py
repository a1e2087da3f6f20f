"""``student``: stage two's (``train_student``) section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.params import require, require_at_least, require_seed, require_time_cap
from pipeline.student.launch import LOGGERS, STRATEGIES
from pipeline.student.soft_prompt import SoftPromptConfig


@dataclasses.dataclass
class StudentParams:
    """``student``: the soft prompt and its MeanFlow distillation (stage ``train_student``)."""

    soft_prompt: SoftPromptConfig = dataclasses.field(default_factory=SoftPromptConfig)
    meanflow_weight: float = 0.0
    """Weight of the seed's MeanFlow objective on the cache's top-k rows (0: off)."""
    rollout_weight: float = 1.0
    """Weight of the rollout objective on the cache's teacher rollouts (``pipeline.student.rollout_objective``; 0: off)."""
    rollouts: Literal["all", "greedy", "sampled"] = "all"
    """Which cached rollouts the rollout objective trains on (greedy: temperature 0)."""
    one_step_fraction: float = 0.5
    """Probability that a rollout row starts fully masked (k = 0, t = 1: the one-step point); the
    others start after a uniform step 1 .. steps - 1."""
    r0_fraction: float = 0.5
    """Probability that a rollout row's target is the whole rest of the trajectory (r = 0); the others
    end after a uniform later step."""
    latent_draws: int = 4
    """K: latents drawn per rollout for a latent student (``soft_prompt.latent_dim`` > 0), scored
    without gradient and trained as ``selection`` says. With a code book of at most K codes, every
    code is scored (an exact E-step)."""
    selection: Literal["best", "weighted", "posterior"] = "best"
    """How the K draws are trained: ``best``, the lowest-loss draw only (winner-takes-all, hard EM);
    ``weighted``, every draw weighted by softmax(-loss / T) of the row-mean losses; ``posterior``,
    soft EM: ``trained_draws`` draws sampled from the responsibilities softmax(log q(answer | z) / tau)
    (log q summed over the targets; tau = 1 is the exact posterior of a uniform prior over the draws,
    tau -> 0 winner-takes-all)."""
    selection_temperature: float = 0.0
    """T of ``weighted`` (> 0); the final tau of ``posterior``."""
    selection_temperature_start: float | None = None
    """``posterior``: tau at step 0, annealed linearly to ``selection_temperature`` at ``max_steps``
    (null: constant). A high start (about the answer length) spreads credit while codes are alike."""
    trained_draws: int = 1
    """``posterior``: draws sampled from the responsibilities and trained per rollout (an unbiased
    estimate of the responsibility-weighted loss)."""
    policy_weight: float = 0.0
    """Weight of the policy-gradient objective (``pipeline.student.policy_objective``): one-step
    samples of the rollout batch's prompts, rewarded by the teacher's pseudo-log-likelihood (0: off)."""
    policy_samples: int = 8
    """M: answers sampled per (prompt, latent) from one student pass (the leave-one-out group)."""
    policy_entropy_weight: float = 5e-4
    """Entropy bonus of the policy objective (keeps q from collapsing before it is consistent)."""
    matching_weight: float = 0.0
    """Weight of DiMO-style distribution matching with an auxiliary soft prompt
    (``pipeline.student.matching_objective``; 0: off). The auxiliary trains one step per student step."""
    matching_beta: float = 0.5
    """0: forward-KL direction p_A - p_T; 1: reverse KL (mode-seeking); between: DiMO's mixture."""
    matching_warmup_steps: int = 100
    """Steps in which only the auxiliary trains (while it equals the teacher the student's signal is 0)."""
    matching_label_smoothing: float = 0.1
    """Label smoothing of the auxiliary's cross-entropy on the student's samples."""
    mean_field_weight: float = 0.0
    """Weight of the mean-field reverse KL to the teacher (``pipeline.student.mean_field_objective``):
    at each answer position of a one-step sample, the teacher's conditional given the sampled others
    over the whole vocabulary (0: off). Rows of greedy rollouts train the greedy anchor, the others a
    latent from the prior."""
    mean_field_samples: int = 1
    """S: contexts sampled per (prompt, latent) from one student pass; each costs one teacher row per
    answer position."""
    mean_field_contexts: Literal["independent", "latent"] = "independent"
    """Where a context's sampling noise comes from: ``independent`` uniforms per (row, sample,
    position); ``latent``, the row's own latent, u_i = Phi(z_i) at answer position i (one context per
    row; needs ``soft_prompt.latent_dim`` >= the answer length and no code book; the anchor's z = 0 gives
    the median context): the noise the student is corrected on is an input it sees, so the
    teacher's corrections can be learned as a function of z, not only averaged over noise."""
    mean_field_entropy_weight: float = 1.0
    """lambda, the weight of E_q[log q] in the reverse KL: 1 is the exact KL(q || p_T); below 1 sharper."""
    tangent: Literal["linear", "seed"] = "linear"
    """dz/dt of the JVP: the forward process's mean-embedding path, or the seed's literal form."""
    loss: Literal["kl", "mse"] = "kl"
    ce_weight: float = 0.0
    """Weight of an auxiliary cross-entropy to the clean tokens x0."""
    adaptive_power: float = 1.0
    """MeanFlow's adaptive weight sg(1 / (loss + eps) ** p); 0 disables it."""
    adaptive_eps: float = 1e-3
    equal_fraction: float = 0.75
    """Fraction of samples with r = t (plain distillation of v); MeanFlow uses 25-75%."""
    tail: Literal["uniform", "drop"] = "uniform"
    """Dense reconstruction of v from the cached top-k."""
    jvp: Literal["no_grad", "grad"] = "no_grad"
    """``no_grad``: JVP without a graph, then an ordinary forward for the gradient (less memory);
    ``grad``: one grad-mode JVP whose primal is u."""
    activation_checkpointing: bool = False
    """Recompute each trunk block's activations in the backward pass instead of keeping them (less
    memory, about one more forward of time); with ``jvp: no_grad`` only."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    batch_size: int = 64
    """Rows per device per step."""
    max_steps: int = 1000
    max_minutes: float | None = None
    """Wall-clock cap (null: none). A cap that stops training before ``max_steps`` fails the stage and
    publishes no student; the run's checkpoints stay, so raising the cap and rerunning finish it."""
    eval_every: int = 100
    """Steps between one-step validation accuracy measurements."""
    devices: int | Literal["auto"] = 1
    """Processes (GPUs) per node; ``auto``: what the launcher (torchrun, srun) started per node. Checked
    against the launcher's world (``pipeline.student.launch``)."""
    num_nodes: int = 1
    """Nodes; more than one needs a launcher on every node (torchrun --nnodes, srun --nodes)."""
    strategy: str = "auto"
    """Lightning strategy: ``auto`` or ``ddp`` (several processes; ``pipeline.student.launch.STRATEGIES``)."""
    accumulate_grad_batches: int = 1
    """Batches whose gradients are summed before each optimizer step (a step then sees this many times
    ``batch_size`` rows per device)."""
    logger: str = "dvclive"
    """``dvclive`` (into ``metrics/student/training``, what ``dvc plots`` reads, always written), or also
    ``csv``, ``tensorboard`` or ``wandb`` into ``logs/student`` (the last two need their package)."""
    log_every_n_steps: int = 10
    precision: str | None = None
    """Lightning precision (one of ``PRECISIONS``); default bf16-mixed on GPU, 32-true on CPU."""
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "batch_size", "max_steps", "eval_every", "latent_draws", "trained_draws", "num_nodes",
                         "accumulate_grad_batches", "log_every_n_steps")
        require(self.devices == "auto" or self.devices >= 1, "devices", f"must be >= 1 or auto, got {self.devices!r}")
        require(self.strategy in STRATEGIES, "strategy", f"{self.strategy!r} is not supported: only "
                f"{' and '.join(STRATEGIES)} are tested with the student's objectives (FSDP and DeepSpeed would need "
                "their own tests; torch.func.jvp is reported to break under FSDP2)")
        require(not (self.activation_checkpointing and self.jvp == "grad"), "activation_checkpointing",
                "needs jvp: no_grad (the grad-mode JVP differentiates through its own tangents, which a recomputed "
                "block does not keep)")
        require(self.logger in LOGGERS, "logger", f"{self.logger!r} is not one of {', '.join(LOGGERS)}")
        require_at_least(self, 2, "policy_samples")
        require_seed(self)
        require_at_least(self, 1, "mean_field_samples")
        require(self.mean_field_contexts in ("independent", "latent"), "mean_field_contexts",
                "must be 'independent' or 'latent'")
        if self.mean_field_contexts == "latent":
            require(self.soft_prompt.latent_dim > 0 and not self.soft_prompt.codebook_size, "mean_field_contexts",
                    "latent needs a Gaussian latent (soft_prompt.latent_dim > 0, codebook_size 0)")
            require(self.mean_field_samples == 1, "mean_field_samples", "must be 1 with mean_field_contexts: latent "
                    "(the latent fixes the context)")
        require_at_least(self, 0, "meanflow_weight", "rollout_weight", "policy_weight", "matching_weight",
                         "mean_field_weight", "selection_temperature", "policy_entropy_weight", "matching_warmup_steps",
                         "mean_field_entropy_weight")
        require(self.meanflow_weight > 0 or self.on_rollouts(), "rollout_weight",
                "meanflow_weight, rollout_weight, policy_weight, matching_weight and mean_field_weight are all 0: "
                "nothing to train")
        for key in ("matching_beta", "matching_label_smoothing"):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        require(self.selection in ("best", "weighted", "posterior"), "selection",
                "must be 'best', 'weighted' or 'posterior'")
        require(self.selection != "weighted" or self.selection_temperature > 0, "selection_temperature",
                "must be > 0 for selection: weighted")
        require(self.selection != "best" or self.selection_temperature == 0, "selection_temperature",
                "applies to selection: weighted or posterior (it is best)")
        if self.selection_temperature_start is not None:
            require(self.selection == "posterior", "selection_temperature_start", "applies to selection: posterior")
            require_at_least(self, 0, "selection_temperature_start")
        require(self.rollouts in ("all", "greedy", "sampled"), "rollouts", "must be 'all', 'greedy' or 'sampled'")
        for key in ("one_step_fraction", "r0_fraction"):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        require_at_least(self, 0, "warmup_steps", "num_workers", "ce_weight", "adaptive_power", "weight_decay")
        require(0.0 <= self.equal_fraction <= 1.0, "equal_fraction", "must be in [0, 1]")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.adaptive_eps > 0, "adaptive_eps", "must be > 0")
        require_time_cap(self.max_minutes)
        require(self.precision is None or self.precision in PRECISIONS, "precision",
                f"{self.precision!r} is not one of {', '.join(PRECISIONS)} (or null)")

    def on_rollouts(self) -> bool:
        """Whether an objective reads the cache's rollouts (their answers, or only their prompts)."""
        return self.rollout_weight + self.policy_weight + self.matching_weight + self.mean_field_weight > 0

    def selection_temperature_at(self, step: int) -> float:
        """tau (or T) at training step ``step``: the linear anneal of ``posterior``."""
        start, end = self.selection_temperature_start, self.selection_temperature
        if start is None:
            return end
        return start + (end - start) * min(step / self.max_steps, 1.0)


PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")
"""The precision values Lightning accepts."""
