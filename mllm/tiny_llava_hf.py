"""A tiny random llava-hf (transformers ``LlavaForConditionalGeneration``) checkpoint built from configs: the
reference model for the conversion tests and the generation benchmark (no download)."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mllm.tiny import TINY_CORPUS

IMAGE_SIZE, PATCH = 32, 8
# A template in the style of llava-1.5-hf's: "USER: <image>\n<text> ASSISTANT:".
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_hf_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``<image>`` but no ``<region>``, as llava-1.5-hf's tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([t.replace("<region>", "region") for t in TINY_CORPUS], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def save_tiny_llava_hf(
    path: str | os.PathLike[str],
    vocab_padding: int = 8,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_shard_size: str = "50GB",
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH,
    vision_layers: int = 2,
    vision_width: int = 64,
    text_layers: int = 2,
    text_width: int = 64,
) -> None:
    """A tiny random llava-hf model + processor saved as transformers writes it (``vocab_padding`` spare rows, as
    llava-1.5-hf pads 32002 tokens to 32064)."""
    tokenizer = llava_hf_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=len(tokenizer) + vocab_padding,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a wider language model than the default init, so greedy tokens depend on the input
        for name, parameter in model.model.language_model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_HF_TEMPLATE,
    )
    model.save_pretrained(path, max_shard_size=max_shard_size)
    processor.save_pretrained(path)
