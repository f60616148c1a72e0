"""Offline text tokenizers for tiny CLOC models (no download): a BPE trained on a caption corpus.

Real checkpoints bring their own tokenizer (``AutoTokenizer.from_pretrained(local_dir)``); this is for the
synthetic world and tests. Special-token ids are chosen so that the CLIP text tower pools at the EOS position:
transformers treats ``eos_token_id == 2`` as a legacy value and pools at the *largest* token id instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0, 1, 2, 3


def train_caption_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 32
) -> PreTrainedTokenizerFast:
    """Train a lower-casing BPE tokenizer on ``texts``; sequences are ``<bos> ... <eos>``, padded with ``<pad>``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def text_config_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The token-id fields a CLIP/SigLIP text config needs to match ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
