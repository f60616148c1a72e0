"""Import a transformers ``LlavaForConditionalGeneration`` checkpoint (llava-hf, e.g. ``llava-1.5-7b-hf``) into
CLOC-LLaVA.

::

    python -m mllm.convert_llava_hf --src llava-1.5-7b-hf --out runs/cloc-llava-from-llava
    python -m mllm.convert_llava_hf --src llava-1.5-7b-hf --out runs/cloc-llava-init --cloc runs/cloc-encoder

Without ``--cloc`` the result is the same model with a plain CLIP tower: its logits equal transformers' own on the
same ``input_ids``/``pixel_values`` (tested within 1e-5, fp32, CPU). With ``--cloc DIR`` the vision tower (ViT and
prompter) comes from a CLOC encoder checkpoint instead — the starting point of "swap the vision tower, then train
stage 1/2" (``docs/llava_hf.md``).

Key mapping (explicit; every source key is consumed or listed as dropped, any other key is an error):

- ``vision_tower.X`` or ``vision_tower.vision_model.X`` → ``model.vision_tower.vision_model.X`` (the CLIP ViT;
  transformers 5 writes its keys flat, the Hub's llava-1.5 under ``vision_model.``);
- ``multi_modal_projector.linear_{1,2}.*`` → ``model.multi_modal_projector.linear_{1,2}.*`` (``mlp2x_gelu``);
- ``language_model.model.X`` → ``model.language_model.X``; ``language_model.lm_head.weight`` → ``lm_head.weight``;
- keys already in transformers' in-memory layout (``model.…``, ``lm_head.…``) are taken as they are.

- New, freshly initialised: ``model.vision_tower.prompter.*`` (no ``--cloc``) and ``model.region_projector.*``;
  they are only used for ``<region>`` tokens, so a text with no ``<region>`` gives exactly llava-hf's outputs.
- Dropped: non-persistent buffers a checkpoint may still carry (``*.position_ids``); with ``--cloc`` the source ViT
  (and, with ``--reinit-projector``, the source projector). From a CLOC checkpoint only ``vision_model.*`` and
  ``prompter.*`` are taken; its text tower, contrastive projections, temperatures and box head are dropped.
- Config carried over: ``vision_feature_layer``, ``vision_feature_select_strategy``, ``image_seq_length`` (checked
  against the tower), ``image_token_id``, ``multimodal_projector_bias``, ``tie_word_embeddings``, the text config;
  the generation config is copied.
- Tokenizer: copied, with ``<region>`` added when absent. The language model's embeddings are resized only when the
  new id does not fit in the vocabulary (llava-1.5-hf pads its vocabulary to 32064 for 32002 tokens, so there it
  fits and nothing is resized; a resized model gets the mean embedding for new rows, transformers' default).
- Processor: a :class:`~mllm.CLOCLlavaProcessor` whose :class:`~cloc_encoder.image_processing.CLOCImageProcessor`
  follows the source's preprocessing (llava-hf 1.5: short side to 336, centre crop → ``resize_mode="crop"``, same
  mean/std); with ``--cloc`` the default is CLOC's own long-side resize + pad. ``CLOCImageProcessor`` equals
  ``CLIPImageProcessor``'s pixels only when the resize is exact (e.g. square images); otherwise its rounding of the
  resized size and crop offset, and PIL vs. torchvision bicubic, differ (``docs/llava_hf.md``).

Safetensors only: a checkpoint with only ``pytorch_model*.bin`` is refused (no pickle loading).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from cloc_encoder import CLOCConfig
from cloc_encoder.image_processing import RESIZE_MODES
from mllm.chat_template import VICUNA_V1_CHAT_TEMPLATE
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.modeling_cloc_llava import CLOCLlavaForConditionalGeneration
from mllm.processing_cloc_llava import CLOCLlavaProcessor
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN, add_mllm_tokens
from mllm.vision_tower import DROPPED_CLOC_KEYS, DROPPED_CLOC_PREFIXES

LEGACY_RENAMES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
"""llava-hf's on-disk (legacy) prefixes → the in-memory layout, which CLOC-LLaVA shares. transformers 5 still
writes the legacy layout in ``save_pretrained``; keys already in the new layout are kept as they are."""

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
PROMPTER_PREFIX = "model.vision_tower.prompter."
REGION_PROJECTOR_PREFIX = "model.region_projector."
CLOC_TOWER_PREFIXES = ("vision_model.", "prompter.")
CHAT_TEMPLATES = ("source", "vicuna_v1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
REPORT_NAME = "convert_llava_hf.json"


class ConversionError(ValueError):
    """The source cannot be converted as asked; the message says what is wrong and what to do."""


@dataclass
class TensorInfo:
    """Where a tensor lives in a safetensors checkpoint, and its shape and dtype (from the file header)."""

    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ConversionPlan:
    """Every key's fate. ``renames``: source key → target key; ``cloc``: CLOC checkpoint key → target key;
    ``dropped`` / ``cloc_dropped``: source / CLOC key → reason; ``fresh``: target key → why it is newly
    initialised."""

    renames: dict[str, str] = field(default_factory=dict)
    cloc: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    cloc_dropped: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)


@dataclass
class ConversionReport:
    """What :func:`convert_llava_hf` did; written to ``<out>/convert_llava_hf.json``."""

    source: str
    cloc: str | None
    dtype: str
    image_token_id: int
    region_token_id: int
    region_token_added: bool
    vocab_size_before: int
    vocab_size_after: int
    projector: str
    image_processor: dict[str, Any]
    chat_template: str
    notes: list[str]
    renamed: int
    from_cloc: int
    dropped: dict[str, str]
    cloc_dropped: dict[str, str]
    fresh: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- reading checkpoints without loading them ------------------------------------------------------------------


def read_safetensors_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Key → :class:`TensorInfo` for the safetensors weights of a checkpoint folder (single file or sharded).

    Raises :class:`ConversionError` for a folder without safetensors weights (``*.bin`` is refused: no pickle).
    """
    folder = Path(path)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        hint = f"; it has {found[:3]}: convert those to safetensors first (loading pickles is refused)" if found else ""
        raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    infos: dict[str, TensorInfo] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor_slice = handle.get_slice(key)
                infos[key] = TensorInfo(name, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return infos


def load_tensors(folder: str | os.PathLike[str], infos: dict[str, TensorInfo], keys: dict[str, str]):
    """``{target key: tensor}`` for ``keys`` (source key → target key), reading one shard at a time."""
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(infos[key].file, []).append(key)
    tensors = {}
    for name, file_keys in by_file.items():
        with safe_open(str(Path(folder) / name), framework="pt") as handle:
            for key in file_keys:
                tensors[keys[key]] = handle.get_tensor(key)
    return tensors


def normalise_llava_key(key: str) -> str | None:
    """A llava-hf key in CLOC-LLaVA's layout, or ``None`` when it is not llava's.

    The outer prefixes follow :data:`LEGACY_RENAMES`; the CLIP ViT's own keys come flat (``embeddings.*``, as
    transformers 5 writes them) or under ``vision_model.`` (older checkpoints such as llava-1.5-7b-hf) and land
    under ``model.vision_tower.vision_model.`` (where :class:`~mllm.CLOCVisionTower` keeps its ViT).
    """
    if not key.startswith(("model.", "lm_head.")):
        for old, new in LEGACY_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        else:
            return None
    if key.startswith(VISION_PREFIX) and not key.startswith(VISION_PREFIX + "vision_model."):
        key = VISION_PREFIX + "vision_model." + key[len(VISION_PREFIX) :]
    return key


# ----- configs -----------------------------------------------------------------------------------------------------


def cloc_config_for_vision_tower(vision_config: Any) -> CLOCConfig:
    """A :class:`CLOCConfig` around a llava-hf vision config (CLIP or SigLIP), for a freshly initialised prompter.

    The CLOC text tower is not built in the MLLM; its config only sizes the prompter's (unused) text projection.
    """
    model_type = vision_config.model_type
    if model_type == "clip_vision_model":
        projection_dim = getattr(vision_config, "projection_dim", None) or vision_config.hidden_size
        return CLOCConfig(
            vision_config=vision_config.to_dict(),
            text_config={"model_type": "clip_text_model", "hidden_size": projection_dim},
            projection_dim=projection_dim,
        )
    if model_type == "siglip_vision_model":
        return CLOCConfig(
            vision_config=vision_config.to_dict(),
            text_config={"model_type": "siglip_text_model", "hidden_size": vision_config.hidden_size},
            contrastive_loss="sigmoid",
        )
    raise ConversionError(
        f"vision tower model_type={model_type!r} is not supported; CLOC-LLaVA takes clip_vision_model or "
        "siglip_vision_model towers"
    )


def check_llava_config(llava: Any) -> None:
    """Refuse llava-hf configs whose forward CLOC-LLaVA would not reproduce."""
    if llava.model_type != "llava":
        raise ConversionError(
            f"config model_type={llava.model_type!r}; expected a 'llava' (LlavaForConditionalGeneration) checkpoint "
            "(LLaVA-NeXT / OneVision tile images and are not supported)"
        )
    if not isinstance(llava.vision_feature_layer, int):
        raise ConversionError(
            f"vision_feature_layer={llava.vision_feature_layer!r}: several feature layers are not supported (one int)"
        )
    if llava.projector_hidden_act != "gelu":
        raise ConversionError(
            f"projector_hidden_act={llava.projector_hidden_act!r}; the mlp2x_gelu projector uses exact GELU ('gelu')"
        )
    if llava.vision_config.model_type == "siglip_vision_model" and llava.vision_feature_select_strategy == "default":
        raise ConversionError(
            "a SigLIP tower with vision_feature_select_strategy='default': llava-hf drops the first patch token, "
            "CLOC-LLaVA keeps all tokens of a tower without CLS; not supported"
        )


def build_config(
    llava: Any,
    *,
    image_token_id: int,
    region_token_id: int,
    cloc_config: CLOCConfig | None = None,
) -> CLOCLlavaConfig:
    """The :class:`CLOCLlavaConfig` for a llava-hf config; ``cloc_config`` replaces the vision tower's config."""
    vision = cloc_config if cloc_config is not None else cloc_config_for_vision_tower(llava.vision_config)
    try:
        config = CLOCLlavaConfig(
            vision_config=vision.to_dict(),
            text_config=llava.text_config.to_dict(),
            projector_type="mlp2x_gelu",
            vision_feature_layer=llava.vision_feature_layer,
            vision_feature_select_strategy=llava.vision_feature_select_strategy,
            image_token_id=image_token_id,
            region_token_id=region_token_id,
            multimodal_projector_bias=llava.multimodal_projector_bias,
            tie_word_embeddings=llava.tie_word_embeddings,
        )
    except ValueError as error:  # e.g. vision_feature_layer out of range for a CLOC tower of another depth
        raise ConversionError(f"the converted config is invalid: {error}") from error
    if cloc_config is None and config.image_seq_length != llava.image_seq_length:
        raise ConversionError(
            f"llava config image_seq_length={llava.image_seq_length} but its vision tower gives "
            f"{config.image_seq_length} features per image; the checkpoint's config is inconsistent"
        )
    return config


# ----- the key plan ------------------------------------------------------------------------------------------------


def plan_conversion(
    source: dict[str, TensorInfo],
    target_shapes: dict[str, tuple[int, ...]],
    *,
    tied: bool,
    cloc: dict[str, TensorInfo] | None = None,
    reinit_projector: bool = False,
) -> ConversionPlan:
    """Decide every key's fate, or raise :class:`ConversionError` naming the keys that do not fit.

    Args:
        source: the llava-hf checkpoint's keys (:func:`read_safetensors_index`).
        target_shapes: CLOC-LLaVA's state-dict keys and shapes.
        tied: whether ``lm_head`` is tied to the input embeddings (then the source may lack it).
        cloc: a CLOC encoder checkpoint's keys whose ViT and prompter replace the source's vision tower.
        reinit_projector: drop the source projector; a fresh one is initialised.
    """
    plan = ConversionPlan()
    unknown, mismatched = [], []
    for key, info in source.items():
        target = normalise_llava_key(key)
        if target is None or target not in target_shapes:
            if cloc is not None and target is not None and target.startswith(VISION_PREFIX):
                plan.dropped[key] = "source vision tower, replaced by the CLOC checkpoint's (--cloc)"
            elif key.endswith("position_ids"):
                plan.dropped[key] = "non-persistent buffer"
            else:
                unknown.append(key)
        elif cloc is not None and target.startswith(VISION_PREFIX):
            plan.dropped[key] = "source vision tower, replaced by the CLOC checkpoint's (--cloc)"
        elif reinit_projector and target.startswith(PROJECTOR_PREFIX):
            plan.dropped[key] = "source projector, re-initialised (--reinit-projector)"
        elif tuple(info.shape) != tuple(target_shapes[target]):
            mismatched.append(f"{key} {tuple(info.shape)} -> {target} {tuple(target_shapes[target])}")
        else:
            plan.renames[key] = target

    if cloc is not None:
        for key, info in cloc.items():
            if key.startswith(CLOC_TOWER_PREFIXES):
                target = VISION_PREFIX + key
                if target not in target_shapes:
                    unknown.append(f"(cloc) {key}")
                elif tuple(info.shape) != tuple(target_shapes[target]):
                    mismatched.append(f"(cloc) {key} {tuple(info.shape)} -> {tuple(target_shapes[target])}")
                else:
                    plan.cloc[key] = target
            elif key.startswith(DROPPED_CLOC_PREFIXES) or key in DROPPED_CLOC_KEYS:
                plan.cloc_dropped[key] = "CLOC encoder part the MLLM does not use"
            elif key.endswith("position_ids"):
                plan.cloc_dropped[key] = "non-persistent buffer"
            else:
                unknown.append(f"(cloc) {key}")

    if unknown or mismatched:
        parts = []
        if unknown:
            parts.append(f"unrecognised keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}")
        raise ConversionError("the checkpoint does not fit CLOC-LLaVA: " + "; ".join(parts))

    filled = set(plan.renames.values()) | set(plan.cloc.values())
    missing = []
    for target in target_shapes:
        if target in filled:
            continue
        if target.startswith(REGION_PROJECTOR_PREFIX):
            plan.fresh[target] = "new: region projector (used only for <region> tokens)"
        elif target.startswith(PROMPTER_PREFIX) and cloc is None:
            plan.fresh[target] = "new: CLOC prompter (used only for <region> tokens)"
        elif target.startswith(PROJECTOR_PREFIX) and reinit_projector:
            plan.fresh[target] = "re-initialised image projector (--reinit-projector); train it in stage 1"
        elif target == "lm_head.weight" and tied:
            plan.fresh[target] = "tied to the input embeddings"
        else:
            missing.append(target)
    if missing:
        where = "the CLOC checkpoint" if cloc is not None and missing[0].startswith(VISION_PREFIX) else "the source"
        raise ConversionError(
            f"missing keys: {where} lacks {len(missing)} weights CLOC-LLaVA needs, e.g. {missing[:8]}"
        )
    return plan


def target_state_shapes(config: CLOCLlavaConfig) -> dict[str, tuple[int, ...]]:
    """CLOC-LLaVA's state-dict keys and shapes for ``config`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        skeleton = CLOCLlavaForConditionalGeneration(config)
    return {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}


# ----- processor ---------------------------------------------------------------------------------------------------


def image_processor_kwargs(source_processor: Any, image_size: int, notes: list[str]) -> dict[str, Any]:
    """``CLOCImageProcessor`` arguments reproducing a llava-hf ``CLIPImageProcessor`` (resize + centre crop)."""
    image_processor = getattr(source_processor, "image_processor", None)
    if image_processor is None:
        notes.append("no image processor in the source; using resize_mode='crop' with OpenAI-CLIP mean/std")
        return {"resize_mode": "crop"}
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    shortest = _size_field(size, "shortest_edge")
    kwargs: dict[str, Any] = {
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    if getattr(image_processor, "do_center_crop", False) and shortest is not None:
        crop_side = {_size_field(crop, "height"), _size_field(crop, "width")}
        if shortest != image_size or crop_side != {image_size}:
            raise ConversionError(
                f"source image processor resizes to {shortest} and crops to {crop_side}, but the vision tower takes "
                f"{image_size}-px images; pass --resize-mode to choose the preprocessing"
            )
        kwargs["resize_mode"] = "crop"
    elif {_size_field(size, "height"), _size_field(size, "width")} == {image_size}:
        kwargs["resize_mode"] = "squash"
    else:
        raise ConversionError(
            f"cannot reproduce the source image preprocessing (size={size}, crop_size={crop}); pass --resize-mode"
        )
    resample = getattr(image_processor, "resample", 3)
    if int(getattr(resample, "value", resample)) != 3:
        notes.append(f"source resample={resample}; CLOCImageProcessor always resizes with bicubic")
    if abs(float(getattr(image_processor, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        notes.append("source rescale_factor is not 1/255; CLOCImageProcessor rescales by 1/255")
    if not getattr(image_processor, "do_normalize", True):
        notes.append("source does not normalise; CLOCImageProcessor always does")
    return kwargs


def _size_field(size: Any, name: str) -> int | None:
    if size is None:
        return None
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return None if value is None else int(value)


# ----- conversion --------------------------------------------------------------------------------------------------


def convert_llava_hf(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cloc: str | os.PathLike[str] | None = None,
    reinit_projector: bool = False,
    resize_mode: str | None = None,
    chat_template: str = "source",
    dtype: str = "auto",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the llava-hf checkpoint folder ``src`` into a CLOC-LLaVA checkpoint folder ``out``.

    Args:
        src: a local llava-hf folder (``config.json``, safetensors weights, tokenizer, processor config).
        out: the folder to write (must not exist or be empty, unless ``overwrite``).
        cloc: a CLOC encoder checkpoint folder whose ViT and prompter replace the source's CLIP tower.
        reinit_projector: re-initialise the image projector. Required with ``cloc`` when the CLOC tower's width
            differs from the source tower's (the projector's input width changes); otherwise an error.
        resize_mode: image preprocessing; default: the source's (``"crop"`` for llava-hf 1.5), or ``"pad"`` (CLOC's
            recipe) with ``cloc``.
        chat_template: ``"source"`` (the source's template, else Vicuna v1) or ``"vicuna_v1"`` (LLaVA-1.5's training
            conversation format, with ``{% generation %}`` marks for assistant-token masks).
        dtype: ``"auto"`` (the source's weight dtype) or ``"float32"``, ``"bfloat16"``, ``"float16"``.
        overwrite: allow a non-empty ``out``.

    Raises:
        ConversionError: for anything that does not fit, with the keys or fields involved.
    """
    src, out = Path(src), Path(out)
    if chat_template not in CHAT_TEMPLATES:
        raise ConversionError(f"chat_template={chat_template!r}; expected one of {CHAT_TEMPLATES}")
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ConversionError(f"resize_mode={resize_mode!r}; expected one of {RESIZE_MODES}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; expected a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if out.resolve() == src.resolve():
        raise ConversionError("--out must differ from --src")

    llava = AutoConfig.from_pretrained(src)
    check_llava_config(llava)
    source = read_safetensors_index(src)
    notes: list[str] = []

    # Tokenizer: <image> must be the config's image token; <region> is added when absent.
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as error:
        raise ConversionError(f"{src}: cannot load its tokenizer ({error})") from error
    had_region = REGION_TOKEN in tokenizer.get_vocab()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
    if image_id != llava.image_token_id:
        raise ConversionError(
            f"the tokenizer's {IMAGE_TOKEN} id is {image_id} but the config's image_token_id is {llava.image_token_id}"
        )
    ids = add_mllm_tokens(tokenizer)
    vocab_before = llava.text_config.vocab_size
    vocab_after = max(vocab_before, len(tokenizer))

    cloc_config = cloc_infos = None
    if cloc is not None:
        config_file = Path(cloc) / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type != CLOCConfig.model_type:
            raise ConversionError(
                f"{cloc}: config model_type={model_type!r}; expected a CLOC encoder checkpoint ('cloc'). "
                "For a CLIP/SigLIP folder, build a CLOC encoder first (cloc_encoder.factory.load_from_clip)"
            )
        cloc_config = CLOCConfig.from_pretrained(cloc)
        cloc_infos = read_safetensors_index(cloc)
        if cloc_config.vision_width != llava.vision_config.hidden_size and not reinit_projector:
            raise ConversionError(
                f"the CLOC tower is {cloc_config.vision_width} wide but the source projector takes "
                f"{llava.vision_config.hidden_size}-wide features; pass reinit_projector=True (--reinit-projector) "
                "to start from a new projector (train it in stage 1)"
            )
    config = build_config(
        llava,
        image_token_id=ids["image_token_id"],
        region_token_id=ids["region_token_id"],
        cloc_config=cloc_config,
    )
    plan = plan_conversion(
        source,
        target_state_shapes(config),
        tied=bool(config.tie_word_embeddings),
        cloc=cloc_infos,
        reinit_projector=reinit_projector,
    )

    # Weights: renamed source tensors (+ the CLOC tower); transformers initialises the fresh keys.
    state = load_tensors(src, source, plan.renames)
    if cloc is not None:
        state.update(load_tensors(cloc, cloc_infos, plan.cloc))
    torch_dtype = _checkpoint_dtype(source, plan.renames) if dtype == "auto" else DTYPES[dtype]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report lists the fresh keys; the plan has them already
    try:
        model, info = CLOCLlavaForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state, dtype=torch_dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    del state
    _check_loading_info(info, plan)
    if vocab_after > vocab_before:
        model.resize_token_embeddings(vocab_after, mean_resizing=True)
        notes.append(f"vocabulary grew {vocab_before} -> {vocab_after}: new embedding rows are the mean embedding")
    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        notes.append("no generation_config.json in the source; transformers' defaults are used")

    # Processor.
    source_processor = None
    if any((src / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        source_processor = AutoProcessor.from_pretrained(src)
    else:
        notes.append("no processor config in the source; image preprocessing from defaults")
    image_size = config.vision_config.vision_config.image_size
    if resize_mode is not None:
        image_kwargs: dict[str, Any] = {"resize_mode": resize_mode}
        if cloc is None and source_processor is not None:
            source_image = source_processor.image_processor
            image_kwargs.update(image_mean=list(source_image.image_mean), image_std=list(source_image.image_std))
    elif cloc is not None:
        image_kwargs = {"resize_mode": "pad"}
    else:
        image_kwargs = image_processor_kwargs(source_processor, image_size, notes)
    if chat_template == "vicuna_v1":
        template = VICUNA_V1_CHAT_TEMPLATE
    else:
        template = getattr(source_processor, "chat_template", None) or tokenizer.chat_template
        if template is None:
            notes.append("the source has no chat template; Vicuna v1 is installed")
    processor = CLOCLlavaProcessor.from_model_config(
        config, tokenizer, image_processor_kwargs=image_kwargs, chat_template=template
    )

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = ConversionReport(
        source=str(src),
        cloc=None if cloc is None else str(cloc),
        dtype=str(torch_dtype).removeprefix("torch."),
        image_token_id=config.image_token_id,
        region_token_id=config.region_token_id,
        region_token_added=not had_region,
        vocab_size_before=vocab_before,
        vocab_size_after=model.config.text_config.vocab_size,
        projector="re-initialised" if reinit_projector else "from the source",
        image_processor={"image_size": image_size, **image_kwargs},
        chat_template=chat_template,
        notes=notes,
        renamed=len(plan.renames),
        from_cloc=len(plan.cloc),
        dropped=plan.dropped,
        cloc_dropped=plan.cloc_dropped,
        fresh=plan.fresh,
    )
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _checkpoint_dtype(source: dict[str, TensorInfo], keys: dict[str, str]) -> torch.dtype:
    """The most common floating dtype of the source tensors (float32 when none is known)."""
    counts: dict[str, int] = {}
    for key in keys:
        if source[key].dtype in SAFETENSORS_DTYPES:
            counts[source[key].dtype] = counts.get(source[key].dtype, 0) + 1
    return SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else torch.float32


def _check_loading_info(info: dict[str, Any], plan: ConversionPlan) -> None:
    """transformers' view of the load must match the plan: only the planned fresh keys missing, nothing else."""
    missing = set(info.get("missing_keys", [])) - set(plan.fresh)
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ConversionError(
            f"loading the converted weights did not match the plan: missing {sorted(missing)[:8]}, "
            f"unexpected {unexpected[:8]}, mismatched {mismatched[:8]}"
        )


# ----- command line ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mllm.convert_llava_hf",
        description="Import a llava-hf LlavaForConditionalGeneration checkpoint into CLOC-LLaVA.",
    )
    parser.add_argument("--src", required=True, help="local llava-hf checkpoint folder (safetensors)")
    parser.add_argument("--out", required=True, help="folder to write the CLOC-LLaVA checkpoint to")
    parser.add_argument("--cloc", default=None, help="CLOC encoder checkpoint folder: its ViT + prompter replace CLIP")
    parser.add_argument(
        "--reinit-projector",
        action="store_true",
        help="start from a new image projector (required when the CLOC tower's width differs from the source's)",
    )
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default=None, help="override image preprocessing")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="source")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        report = convert_llava_hf(
            args.src,
            args.out,
            cloc=args.cloc,
            reinit_projector=args.reinit_projector,
            resize_mode=args.resize_mode,
            chat_template=args.chat_template,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {report.renamed} source tensors, {report.from_cloc} from the CLOC checkpoint, "
        f"{len(report.fresh)} new, {len(report.dropped) + len(report.cloc_dropped)} dropped "
        f"(details in {Path(args.out) / REPORT_NAME})"
    )
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ConversionError",
    "ConversionPlan",
    "ConversionReport",
    "build_config",
    "convert_llava_hf",
    "main",
    "plan_conversion",
    "read_safetensors_index",
]
