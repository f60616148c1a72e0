"""Import a transformers ``LlavaForConditionalGeneration`` checkpoint (llava-hf, e.g. ``llava-1.5-7b-hf``) into
CLOC-LLaVA.

::

    python -m mllm.convert_llava_hf --src llava-1.5-7b-hf --out runs/cloc-llava-from-llava
    python -m mllm.convert_llava_hf --src llava-1.5-7b-hf --out runs/cloc-llava-init --cloc runs/cloc-encoder

Without ``--cloc`` the result is the same model with a plain CLIP tower: its logits equal transformers' own on the
same ``input_ids``/``pixel_values`` (tested within 1e-5, fp32, CPU). With ``--cloc DIR`` the vision tower (ViT and
prompter) comes from a CLOC encoder checkpoint instead — the starting point of "swap the vision tower, then train
stage 1/2" (``docs/llava_hf.md``).

Key mapping (explicit, in :mod:`mllm.llava_hf_mapping`; every source key is consumed or listed as dropped, any other
key is an error):

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from cloc_encoder import CLOCConfig
from cloc_encoder.image_processing import RESIZE_MODES
from mllm.chat_template import VICUNA_V1_CHAT_TEMPLATE
from mllm.configuration_cloc_llava import CLOCLlavaConfig
from mllm.llava_hf_mapping import (
    ConversionError,
    ConversionPlan,
    build_config,
    check_llava_config,
    checkpoint_dtype,
    image_processor_kwargs,
    load_tensors,
    plan_conversion,
    read_safetensors_index,
    target_state_shapes,
)
from mllm.modeling_cloc_llava import CLOCLlavaForConditionalGeneration
from mllm.processing_cloc_llava import CLOCLlavaProcessor
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN, add_mllm_tokens

CHAT_TEMPLATES = ("source", "vicuna_v1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT_NAME = "convert_llava_hf.json"


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


# ----- conversion --------------------------------------------------------------------------------------------------


def _read_source_config(src: Path) -> Any:
    """The source folder's config; :class:`ConversionError` naming ``config.json`` when it is not a model folder."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{src}: no config.json; --src must be a llava-hf checkpoint folder")
    try:
        return AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{config_file}: not a transformers model config ({first_line})") from error


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
    _check_arguments(src, out, resize_mode, chat_template, dtype, overwrite)
    llava = _read_source_config(src)
    check_llava_config(llava)
    source = read_safetensors_index(src)
    notes: list[str] = []
    tokenizer, had_region = _tokenizer_with_region_token(src, llava)
    ids = add_mllm_tokens(tokenizer)
    vocab_before = llava.text_config.vocab_size
    vocab_after = max(vocab_before, len(tokenizer))
    cloc_config, cloc_infos = _cloc_tower(cloc, llava, reinit_projector) if cloc is not None else (None, None)
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
    torch_dtype = checkpoint_dtype(source, plan.renames) if dtype == "auto" else DTYPES[dtype]
    model = _load_model(src, cloc, config, plan, source, cloc_infos, torch_dtype)
    if vocab_after > vocab_before:
        model.resize_token_embeddings(vocab_after, mean_resizing=True)
        notes.append(f"vocabulary grew {vocab_before} -> {vocab_after}: new embedding rows are the mean embedding")
    try:
        model.generation_config = GenerationConfig.from_pretrained(src)
    except OSError:
        notes.append("no generation_config.json in the source; transformers' defaults are used")
    processor, image_kwargs = _processor(src, config, tokenizer, cloc is not None, resize_mode, chat_template, notes)

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
        image_processor={"image_size": config.vision_config.vision_config.image_size, **image_kwargs},
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


def _check_arguments(
    src: Path, out: Path, resize_mode: str | None, chat_template: str, dtype: str, overwrite: bool
) -> None:
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


def _tokenizer_with_region_token(src: Path, llava: Any) -> tuple[Any, bool]:
    """The source tokenizer (its ``<image>`` must be the config's image token) and whether it has ``<region>``."""
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
    return tokenizer, had_region


def _cloc_tower(cloc: str | os.PathLike[str], llava: Any, reinit_projector: bool) -> tuple[CLOCConfig, dict]:
    """The CLOC encoder checkpoint's config and tensor index, checked against the source projector's width."""
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
    return cloc_config, cloc_infos


def _load_model(
    src: Path,
    cloc: str | os.PathLike[str] | None,
    config: CLOCLlavaConfig,
    plan: ConversionPlan,
    source: dict,
    cloc_infos: dict | None,
    torch_dtype: torch.dtype,
) -> CLOCLlavaForConditionalGeneration:
    """The converted model: the planned tensors loaded, the fresh keys initialised by transformers."""
    state = load_tensors(src, source, plan.renames)
    if cloc is not None:
        state.update(load_tensors(cloc, cloc_infos, plan.cloc))
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
    return model


def _processor(
    src: Path,
    config: CLOCLlavaConfig,
    tokenizer: Any,
    with_cloc: bool,
    resize_mode: str | None,
    chat_template: str,
    notes: list[str],
) -> tuple[CLOCLlavaProcessor, dict[str, Any]]:
    """The processor (image preprocessing as the source's, or CLOC's pad with a CLOC tower) and its image kwargs."""
    source_processor = None
    if any((src / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        source_processor = AutoProcessor.from_pretrained(src)
    else:
        notes.append("no processor config in the source; image preprocessing from defaults")
    image_size = config.vision_config.vision_config.image_size
    if resize_mode is not None:
        image_kwargs: dict[str, Any] = {"resize_mode": resize_mode}
        if not with_cloc and source_processor is not None:
            source_image = source_processor.image_processor
            image_kwargs.update(image_mean=list(source_image.image_mean), image_std=list(source_image.image_std))
    elif with_cloc:
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
    return processor, image_kwargs


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


__all__ = ["REPORT_NAME", "ConversionError", "ConversionReport", "convert_llava_hf", "main"]
