"""What a llava-hf checkpoint maps to in CLOC-LLaVA: the config (:func:`build_config`), the image preprocessing
(:func:`image_processor_kwargs`) and every weight key (:func:`plan_conversion`: renamed, taken from a CLOC
encoder checkpoint, dropped with a reason, or freshly initialised with a reason), read from safetensors headers
without loading the tensors. :mod:`mllm.convert_llava_hf` carries the mapping out."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cloc_encoder import CLOCConfig
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.modeling_cloc_llava import CLOCLlavaForConditionalGeneration
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
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


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


def checkpoint_dtype(source: dict[str, TensorInfo], keys: dict[str, str]) -> torch.dtype:
    """The most common floating dtype of the source tensors (float32 when none is known)."""
    counts: dict[str, int] = {}
    for key in keys:
        if source[key].dtype in SAFETENSORS_DTYPES:
            counts[source[key].dtype] = counts.get(source[key].dtype, 0) + 1
    return SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else torch.float32


__all__ = [
    "ConversionError",
    "ConversionPlan",
    "TensorInfo",
    "build_config",
    "check_llava_config",
    "checkpoint_dtype",
    "cloc_config_for_vision_tower",
    "image_processor_kwargs",
    "load_tensors",
    "normalise_llava_key",
    "plan_conversion",
    "read_safetensors_index",
    "target_state_shapes",
]
