"""Tokenizer helpers for CLOC-LLaVA: the ``<image>``/``<region>`` placeholder tokens and an offline test tokenizer.

Real LLMs bring their own tokenizer (``AutoTokenizer.from_pretrained(local_dir)``); :func:`add_mllm_tokens` adds
the two placeholders to it (then resize the model's embeddings). :func:`train_chat_tokenizer` builds a small
byte-level BPE offline, for the synthetic world and tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mllm.chat_template import VICUNA_V1_CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
CHAT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, REGION_TOKEN)  # ids 0..5
CHAT_SPECIAL_TOKENS_MAP = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
"""The roles of :func:`train_chat_tokenizer`'s special tokens (the chat template's ``eos_token`` and the rest)."""


def train_chat_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (no download), Llama-style: ``<s>`` prepended, no ``</s>`` appended.

    Digits are split one per token (as Llama does), so box coordinates are spelled digit by digit. Special tokens:
    ``<unk> <s> </s> <pad> <image> <region>``; the Vicuna v1 chat template is attached. Decoding reproduces the
    text exactly (byte level), which streaming and box parsing rely on.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **CHAT_SPECIAL_TOKENS_MAP,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "region_token": REGION_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
    )
    wrapped.chat_template = VICUNA_V1_CHAT_TEMPLATE
    return wrapped


def add_mllm_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add ``<image>`` and ``<region>`` as special tokens (and ``<pad>`` when there is no pad token).

    Returns ``{"image_token_id": ..., "region_token_id": ..., "vocab_size": len(tokenizer)}`` for the config; call
    ``model.resize_token_embeddings(len(tokenizer))`` afterwards when the vocabulary grew.
    """
    new = [token for token in (IMAGE_TOKEN, REGION_TOKEN) if token not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "region_token_id": tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        "vocab_size": len(tokenizer),
    }


__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "CHAT_SPECIAL_TOKENS_MAP",
    "IMAGE_TOKEN",
    "REGION_TOKEN",
    "add_mllm_tokens",
    "train_chat_tokenizer",
]
