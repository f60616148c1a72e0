"""Tiny VESL components for the tests, all built offline: a random OWLv2 and a random BLIP captioner (from
configs, with tokenizers from small hand-written vocabularies) and POS taggers trained on a few tagged captions."""

from __future__ import annotations

import json
import os
from pathlib import Path

WORDS = [
    "a",
    "an",
    "the",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "diamond",
    "shape",
    "shapes",
    "and",
    "of",
    "with",
    "on",
    "in",
    "left",
    "right",
    "above",
    "below",
    "picture",
    "photo",
]
"""Every word the synthetic world's captions use (and a few more)."""

LEXICON = {
    **dict.fromkeys(["a", "an", "the", "this"], "DT"),
    **dict.fromkeys(["small", "large", "red", "green", "blue", "yellow"], "JJ"),
    **dict.fromkeys(["circle", "square", "triangle", "diamond", "picture", "photo"], "NN"),
    "shapes": "NNS",
    "and": "CC",
    **dict.fromkeys(["of", "with", "on", "in", "above", "below"], "IN"),
    **dict.fromkeys(["left", "right"], "RB"),
    ",": ",",
    ".": ".",
    ":": ":",
}
"""Penn Treebank tags of :data:`WORDS` as they occur in the synthetic captions."""

OWL_IMAGE_SIZE = 64


def lexicon_tagger():
    """NLTK's UnigramTagger over :data:`LEXICON` (unknown words: NN)."""
    from nltk.tag import DefaultTagger, UnigramTagger

    return UnigramTagger(model=LEXICON, backoff=DefaultTagger("NN")).tag


def write_perceptron_tagger(nltk_data: Path) -> Path:
    """Train NLTK's averaged perceptron on tagged synthetic captions and store it where
    ``NLTK_DATA=nltk_data`` finds it as ``averaged_perceptron_tagger_eng`` (the default tagger's data)."""
    from nltk.tag.perceptron import PerceptronTagger

    captions = [
        "a small red circle , a large blue square and a green triangle",
        "the yellow diamond above a small green circle .",
        "a large red square left of the blue triangle and a small yellow circle",
    ]
    sentences = [[(word, LEXICON[word]) for word in caption.split()] for caption in captions]
    tagger = PerceptronTagger(load=False)
    tagger.train(sentences * 4, nr_iter=5)
    folder = nltk_data / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in zip(tagger.param_files("eng"), tagger.encode_json_obj(), strict=True):
        (folder / name).write_text(json.dumps(obj), encoding="utf-8")
    return nltk_data


def _clip_tokenizer():
    """A CLIP BPE tokenizer whose merges spell out every word of :data:`WORDS`."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in sorted(set("".join(WORDS)) | {",", "."}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        current = word[0]
        for i in range(1, len(word)):
            piece = word[i] + ("</w>" if i == len(word) - 1 else "")
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """A random 1-layer OWLv2 (64-px input, 16-px patches: 16 boxes per image) with its processor."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = _clip_tokenizer()
    vocab = tokenizer.get_vocab()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={**tower, "image_size": OWL_IMAGE_SIZE, "patch_size": 16},
        projection_dim=32,  # OWL's class head compares image embeddings of the text width with the queries
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random box heads saturate (degenerate corner boxes): keep boxes near their patch grid
        for layer in (model.box_head.dense0, model.box_head.dense1, model.box_head.dense2):
            layer.weight.normal_(0.0, 0.1)
            layer.bias.zero_()
    model.save_pretrained(folder)
    size = {"height": OWL_IMAGE_SIZE, "width": OWL_IMAGE_SIZE}
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size=size), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A random 1-layer BLIP captioner (32-px input) whose word-level vocabulary is :data:`WORDS`."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS, ",", "."]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, bos_token="[DEC]")
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **tower,
            "vocab_size": len(tokens),
            "max_position_embeddings": 48,
            "bos_token_id": 5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "encoder_hidden_size": 32,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    return env
