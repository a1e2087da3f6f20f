"""The official LLaDA-MoE ``generate`` (the public reference inference code), kept as the oracle for
``pipeline.generation.sampler``, with the two EOS options of LLaDA-8B's ``generate.py`` (otherwise the
same code): ``logits_eos_inf`` and ``confidence_eos_eot_inf``, as written there, including its chained
assignment that puts EOS's -inf into ``logits_with_noise`` (the logits themselves at temperature 0 only).

Changed only where needed to run here: ``model(x)`` returns logits directly, the batch is one
sequence, ``torch.rand`` may take a generator, the EOS and EOT ids (hard-coded there as LLaDA-8B's
126081 and 126348) are arguments, and the positions a step commits are the first ``k`` of a stable
descending sort of the confidences rather than ``torch.topk``'s: the two agree unless confidences tie
at the cut, where topk's choice is unspecified (on CPU neither the first nor the last positions).
Random logits never tie; ``confidence_eos_eot_inf`` ties every EOS/EOT prediction at 0, and the
batched sampler breaks such ties by position, as the stable sort does.
"""

import numpy as np
import torch
import torch.nn.functional as F


def add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", mask_id=156895, logits_eos_inf=False,
             confidence_eos_eot_inf=False, eos_id=126081, eot_id=126348):
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (
            x[:, prompt.shape[1] + num_block * block_length : prompt.shape[1] + (num_block + 1) * block_length :]
            == mask_id
        )
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                logits = model(x_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                logits_with_noise[:, :, eos_id] = logits[:, :, eot_id] = -torch.inf
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                order = torch.sort(confidence[j], descending=True, stable=True).indices
                select_index = order[: num_transfer_tokens[j, i]]
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x
