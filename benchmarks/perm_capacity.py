"""Can the latent pathway (z -> prompt MLP -> prefix) express M different rules in one pass?

A diagnostic that uses task knowledge only to measure (the real student never sees a rule): a student
with the default soft prompt gets M fixed codes, code c a fixed z_c ~ N(0, I_d), and is trained at the
one-step point (all answer positions masked, r = 0, t = 1) to answer ``perm:abcde`` with the index
permutation sigma_c of the prompt's letters. M = 1 is the "one consistent rule" probe of DESIGN 11.4;
if greedy validity per code falls as M grows, the pathway caps the diversity any objective can buy,
and it must be widened (``--latent-dim``, ``--prompt-length``, ``--hidden-size``, or where z enters:
``--latent-into prompt_and_answer``) before a loss is judged.

    python benchmarks/perm_capacity.py --codes 4 24 120          # needs data/ and artifacts/teacher
    python benchmarks/perm_capacity.py --codes 24 --latent-dim 32 --hidden-size 256 --tag wide
    python benchmarks/perm_capacity.py --codes 4 24 120 --latent-into prompt_and_answer --tag answer

Reported per M, on the validation split's perm prompts, decoding each code greedily in one step:
validity (a permutation of the letters) averaged over codes and its minimum over codes, the fraction
that follows the code's own rule, and the distinct valid answers per prompt over the M codes.
Writes ``metrics/benchmarks/perm_capacity[_TAG].json``.
"""

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core.lr_schedule import warmup_cosine
from pipeline.data.layout import Layout, load_split
from pipeline.data.tasks import TASKS
from pipeline.data.tokenizer import decode_answer
from pipeline.student.model import Student
from pipeline.student.soft_prompt import SoftPromptConfig
from pipeline.teacher.artifact import load_teacher

LETTERS = 5  # perm prompts hold 5 distinct letters
PREFIX = "perm:"


def rules(M: int, seed: int) -> list[tuple[int, ...]]:
    """M distinct index permutations of the letters (all 120 when M = 120; identity first)."""
    every = list(itertools.permutations(range(LETTERS)))
    if M >= len(every):
        return every
    return [every[0]] + random.Random(seed).sample(every[1:], M - 1)


def answer_ids(tokenizer, prompt: str, rule: tuple[int, ...], gen_length: int, pad: int) -> list[int]:
    letters = prompt[len(PREFIX):]
    ids = tokenizer("".join(letters[i] for i in rule), add_special_tokens=False)["input_ids"]
    return ids + [pad] * (gen_length - len(ids))


def perm_rows(data_dir: Path, split: str, prompt_length: int, limit: int | None = None):
    """(prompt ids (N, P), their attention mask, prompt strings) of the split's perm rows; read into
    memory (a ``datasets`` filter would write a cache file into the DVC-tracked split)."""
    rows = load_split(data_dir, split).with_format("numpy", columns=["task", "prompt", "input_ids", "attention_mask"])[:]
    index = (rows["task"] == "perm").nonzero()[0][:limit]
    return (torch.as_tensor(rows["input_ids"][index, :prompt_length]).long(),
            torch.as_tensor(rows["attention_mask"][index, :prompt_length]).long(), rows["prompt"][index].tolist())


def one_step_logits(student: Student, prompt_ids, attention, codes, gen_length: int, mask_id: int) -> torch.Tensor:
    """u(all-masked answer, r = 0, t = 1, z) at the answer positions: (B, G, V)."""
    B = prompt_ids.shape[0]
    ids = torch.cat((prompt_ids, torch.full((B, gen_length), mask_id, dtype=prompt_ids.dtype)), dim=1)
    mask = torch.cat((attention, torch.ones(B, gen_length, dtype=attention.dtype)), dim=1)
    hidden = student.hidden(input_ids=ids, attention_mask=mask, r=0.0, t=1.0, latent=codes)[:, -gen_length:]
    return student.head(hidden)


def measure(args, M: int, base, tokenizer, layout, train, val) -> dict:
    torch.manual_seed(args.seed)
    answer_positions = layout.gen_length if args.latent_into == "prompt_and_answer" else 0
    config = SoftPromptConfig(latent_dim=args.latent_dim, hidden_size=args.hidden_size, prompt_length=args.prompt_length,
                              latent_answer_positions=answer_positions, anchor="none")
    student = Student(base, config=config)
    trained = list(student.soft_prompt.parameters())
    mask_id, G = base.config.mask_token_id, layout.gen_length
    sigma = rules(M, args.seed)
    codes = torch.randn(M, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))  # (M, d)
    train_ids, train_mask, train_prompts = train
    targets = {}  # (row, code) -> answer ids, built lazily
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, 50, args.steps))
    rng = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    student.train()
    for step in range(args.steps):
        rows = torch.randint(len(train_ids), (args.batch_size,), generator=rng)
        code = torch.randint(M, (args.batch_size,), generator=rng)
        labels = torch.tensor([targets.setdefault((r, c), answer_ids(tokenizer, train_prompts[r], sigma[c], G,
                                                                    layout.pad_token_id))
                               for r, c in zip(rows.tolist(), code.tolist())])  # (B, G)
        logits = one_step_logits(student, train_ids[rows], train_mask[rows], codes[code], G, mask_id)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  M={M} step {step}: loss {loss.item():.4f}", flush=True)
    train_seconds = time.perf_counter() - started
    return {"M": M, **evaluate(student, codes, sigma, tokenizer, layout, val), "final_loss": round(loss.item(), 4),
            "train_seconds": round(train_seconds, 1)}


@torch.no_grad()
def evaluate(student, codes, sigma, tokenizer, layout, val) -> dict:
    """Greedy one-step answers of every validation prompt under every code."""
    student.eval()
    M, G = len(sigma), layout.gen_length
    mask_id, stops = student.base.config.mask_token_id, {layout.pad_token_id}
    ids, attention, prompts = val
    perm = TASKS["perm"]
    valid = torch.zeros(len(ids), M)
    follows = torch.zeros(len(ids), M)
    answers: list[list[str]] = [[] for _ in range(len(ids))]
    for c in range(M):
        logits = one_step_logits(student, ids, attention, codes[c].expand(len(ids), -1), G, mask_id)
        logits[..., mask_id] = -math.inf
        for i, tokens in enumerate(logits.argmax(-1).tolist()):
            text = decode_answer(tokenizer, tokens, stops)
            prompt = prompts[i]
            letters = prompt[len(PREFIX):]
            valid[i, c] = perm.is_valid(prompt, text)
            follows[i, c] = text == "".join(letters[j] for j in sigma[c])
            answers[i].append(text)
    distinct = [len({a for a, ok in zip(row, valid[i].tolist()) if ok}) for i, row in enumerate(answers)]
    per_code = valid.mean(dim=0)  # (M,)
    return {"valid": round(valid.mean().item(), 4), "valid_min_code": round(per_code.min().item(), 4),
            "codes_above_0.9": int((per_code >= 0.9).sum()), "follows_rule": round(follows.mean().item(), 4),
            "distinct_valid": round(sum(distinct) / len(distinct), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, nargs="+", default=[4, 24, 120], help="M values")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    defaults = SoftPromptConfig()
    parser.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--prompt-length", type=int, default=defaults.prompt_length)
    parser.add_argument("--latent-into", choices=("prompt", "prompt_and_answer"), default="prompt",
                        help="where z enters: the prompt MLP only, or also the answer positions' inputs "
                             "(soft_prompt.latent_answer_positions = gen_length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-prompts", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--teacher", type=Path, default=Path("artifacts/teacher"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    base, tokenizer, _ = load_teacher(args.teacher)
    layout = Layout.load(args.data)
    P = layout.prompt_length
    train, val = perm_rows(args.data, "train", P), perm_rows(args.data, "val", P, args.val_prompts)
    rows = []
    for M in args.codes:
        rows.append(measure(args, M, base, tokenizer, layout, train, val))
        print(json.dumps(rows[-1]), flush=True)
    pathway = {"latent_dim": args.latent_dim, "hidden_size": args.hidden_size, "prompt_length": args.prompt_length,
               "latent_into": args.latent_into}
    print(f"\npathway {pathway}, {args.steps} steps of batch {args.batch_size}, {len(val[0])} validation prompts")
    print("| M | valid (mean over codes) | worst code | codes >= 0.9 | follows its rule | distinct valid of M |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']} | {r['valid']:.3f} | {r['valid_min_code']:.3f} | {r['codes_above_0.9']} | "
              f"{r['follows_rule']:.3f} | {r['distinct_valid']:.1f} |")
    out = Path("metrics/benchmarks") / f"perm_capacity{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pathway": pathway, "steps": args.steps, "batch_size": args.batch_size,
                               "lr": args.lr, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
