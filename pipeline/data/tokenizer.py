"""Tokenizers: the built-in character-level one, and loading/encoding/decoding for any checkpoint.

Every tokenizer, ours included, is a ``tokenizer.json`` loaded through transformers, so the built-in
default exercises the same code path as LLaDA-8B's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.core.errors import CheckpointError
from pipeline.models.checkpoint_io import read_json

# LLaDA's own names for its special tokens.
EOS, BOS, MASK, UNK = "<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|unk|>"
EOT_TOKEN = "<|eot_id|>"
"""LLaDA-8B-Instruct's end of turn, which the sampler's ``confidence_eos_eot_inf`` demotes with EOS."""
SPECIAL_TOKENS = (EOS, BOS, MASK, UNK)


def build_char_tokenizer(alphabet: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0..3 are EOS (also padding), BOS, MASK, UNK, then one id per
    character of ``alphabet`` in sorted order. Encoding prepends BOS, like LLaDA's tokenizer."""
    chars = sorted(set(alphabet))
    if any(len(c) != 1 for c in chars):
        raise ValueError("alphabet must be single characters")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK, unk_token=UNK
    )


def load_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint directory, through transformers (``tokenizer.json`` required)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint}: no tokenizer.json")
    if (checkpoint / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(checkpoint))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    # Special tokens are named in tokenizer_config.json; without it the unknown token would go unnamed
    # and ``unknown_characters`` would let unknown characters through. The model section names it too.
    model = read_json(checkpoint / "tokenizer.json").get("model")
    if isinstance(model, dict) and tokenizer.unk_token is None:
        unk = model.get("unk_token")
        if unk is None and isinstance(model.get("unk_id"), int):  # Unigram: an index into its vocab
            unk = model["vocab"][model["unk_id"]][0]
        if isinstance(unk, str):
            tokenizer.unk_token = unk
    return tokenizer


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat: bool | None = None, system: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt. ``chat=None`` applies the tokenizer's chat template when it has one
    (LLaDA-8B-Instruct); the template already holds BOS, so no special tokens are added then.
    ``system``: a system message before each prompt (needs the chat template)."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("the tokenizer has no chat template")
    if system is not None and not chat:
        raise CheckpointError("a system prompt needs the tokenizer's chat template")
    if chat:
        head = [{"role": "system", "content": system}] if system is not None else []
        texts = [
            tokenizer.apply_chat_template([*head, {"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False)
            for p in prompts
        ]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def unknown_characters(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The characters of ``text`` the tokenizer can only encode as its unknown token (none for a
    tokenizer with a byte fallback, like LLaDA-8B's; the built-in one knows only its alphabet)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in tokenizer(text, add_special_tokens=False)["input_ids"]:
        return []
    return [c for c in dict.fromkeys(text) if unk in tokenizer(c, add_special_tokens=False)["input_ids"]]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, config, checkpoint: str | Path | None = None) -> set[int]:
    """Ids that end an answer: the config's and tokenizer's EOS, and ``generation_config.json``'s
    ``eos_token_id`` (an int or a list; LLaDA-8B-Instruct ends turns with ``<|eot_id|>``)."""
    stops = {i for i in (config.eos_token_id, tokenizer.eos_token_id) if i is not None}
    if checkpoint is not None and (Path(checkpoint) / "generation_config.json").is_file():
        value = read_json(Path(checkpoint) / "generation_config.json").get("eos_token_id")
        stops.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    if not stops:
        raise CheckpointError("no EOS id in the config, the tokenizer or generation_config.json")
    return stops


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: set[int]) -> str:
    """The answer text: tokens before the first stop id, special tokens removed."""
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(list(ids[:end]), skip_special_tokens=True)


def eos_and_eot_ids(tokenizer, config, checkpoint: Path) -> tuple[int | None, int | None]:
    """The ids LLaDA's EOS options act on (LLaDA's code hard-codes LLaDA-8B's 126081 and 126348): EOS,
    the tokenizer's end-of-text token (else the config's ``eos_token_id``, else the first of
    ``generation_config.json``'s), and EOT, ``<|eot_id|>`` when the tokenizer has it, else None."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if eos is None and (checkpoint / "generation_config.json").is_file():
        value = read_json(checkpoint / "generation_config.json").get("eos_token_id")
        eos = value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None
    eot = tokenizer.get_vocab().get(EOT_TOKEN)
    return eos, eot
