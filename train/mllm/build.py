"""Build the pieces of an MLLM training run from its config: tokenizer, processor and model (what trains:
:mod:`train.mllm.trainable`; the stage-1 projector file: :mod:`train.mllm.projector`).

The model comes from one of:

- ``model_path``: a CLOC-LLaVA folder (``save_pretrained`` of :class:`~mllm.CLOCLlavaForConditionalGeneration`);
- ``vision_tower`` (a CLOC encoder folder) and/or ``language_model`` (a causal-LM folder): assembled without
  initialising the loaded parts twice (the composite is built on the ``meta`` device and the loaded modules put in
  place); a part not given is the tiny one of :mod:`mllm.tiny`, and every new weight (projectors, tiny parts) comes
  from ``init_seed``, so stage 2 rebuilds exactly the frozen base stage 1 trained its projector against.

Under a ZeRO-3 DeepSpeed config (``ds_config``) every part is built partitioned (:mod:`train.mllm.zero3`): loaded
parts through transformers' DeepSpeed integration, new modules under ``zero.Init``, the stage-1 projector copied in
through gathered parameters; no rank holds the full model. Tiny parts are then initialised by transformers' ZeRO-3
initialisation (rank 0, module by module): the same ``init_seed`` gives other values than without ZeRO-3, which
``model_source`` records (``"seeded_init": "zero3"``), so a stage-1 projector from the other regime is flagged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from cloc_encoder.distributed import DistributedContext
from cloc_encoder.image_processing import CLOCImageProcessor
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, CLOCVisionTower
from mllm.chat_template import CHAT_TEMPLATES, VICUNA_V1_CHAT_TEMPLATE
from mllm.loading import load_pretrained_model, quantization_config_for
from mllm.modeling_cloc_llava import CLOCLlavaProjector
from mllm.tiny import TINY_CORPUS, tiny_config
from mllm.tokenization import CHAT_SPECIAL_TOKENS_MAP, IMAGE_TOKEN, REGION_TOKEN, add_mllm_tokens, train_chat_tokenizer
from train.config import ConfigError
from train.mllm.config import MLLMTrainConfig
from train.mllm.conversations import ConversationRecord
from train.mllm.projector import load_projector
from train.mllm.zero3 import gathered_state_dict, is_zero3, partition_remaining, sharded_build, zero_init

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
BASE_MODEL_DIR = "base_model"


# ----- tokenizer and processor ---------------------------------------------------------------------------------------


def _has_tokenizer(folder: str | os.PathLike[str] | None) -> bool:
    return folder is not None and (Path(folder) / "tokenizer_config.json").is_file()


def _projector_tokenizer(config: MLLMTrainConfig) -> Path | None:
    """The tokenizer stage 1 used, next to ``pretrain_mm_projector`` (a checkpoint folder, or an ``output_dir``
    holding ``mm_projector.safetensors`` and the trained ``tokenizer/``)."""
    if not config.pretrain_mm_projector:
        return None
    path = Path(config.pretrain_mm_projector)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder / TOKENIZER_DIR):
        if _has_tokenizer(candidate):
            return candidate
    return None


def training_texts(records: Sequence[ConversationRecord], chat_template: str) -> list[str]:
    """The tiny tokenizer's training corpus: the tiny corpus of chat and box text, then every conversation as
    ``chat_template`` renders it, so that the BPE learns what the model reads as often as it reads it: role markers
    (on the synthetic world, ``instruction_first``: ``USER:`` 5 tokens → 1, `` ASSISTANT:`` 11 → 2), Vicuna's
    system prompt (``vicuna_v1``: 28 tokens; 127 without it in the corpus), the questions and replies. A
    conversation the template rejects is left out here (training reports it)."""
    texts = list(TINY_CORPUS)
    for record in records:
        try:
            rendered, _ = render_jinja_template(
                conversations=[record.messages()], chat_template=chat_template, **CHAT_SPECIAL_TOKENS_MAP
            )
        except TemplateError:
            continue
        texts.append(rendered[0])
    return texts


def _template_text(config: MLLMTrainConfig) -> str | None:
    """The Jinja text of ``config.chat_template`` (a name in :data:`CHAT_TEMPLATES` or a file); ``None`` when unset."""
    if not config.chat_template:
        return None
    if config.chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[config.chat_template]
    path = Path(config.chat_template)
    if not path.is_file():
        raise ConfigError(
            f"chat_template={config.chat_template!r}: not one of {sorted(CHAT_TEMPLATES)} nor a Jinja template file"
        )
    return path.read_text(encoding="utf-8")


def _with_template(tokenizer: PreTrainedTokenizerBase, config: MLLMTrainConfig) -> PreTrainedTokenizerBase:
    template = _template_text(config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def build_tokenizer(
    config: MLLMTrainConfig,
    records: Sequence[ConversationRecord],
    context: DistributedContext,
    resume_dir: Path | None = None,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer, first found of: the resumed checkpoint's, ``tokenizer``, ``model_path``'s, the stage-1
    folder's (next to ``pretrain_mm_projector``), ``language_model``'s, ``output_dir/tokenizer``, or — for the tiny
    LLM only — a byte-level BPE trained on the training texts (rank 0 trains and saves, every rank loads).
    ``<image>``/``<region>`` (and a pad token) are added when missing; ``chat_template`` is applied."""
    candidates = [
        resume_dir if _has_tokenizer(resume_dir) else None,
        config.tokenizer,
        config.model_path,
        _projector_tokenizer(config),
        config.language_model,
    ]
    source = next((c for c in candidates if c), None)
    saved = Path(config.output_dir) / TOKENIZER_DIR
    if source is None and _has_tokenizer(saved):
        source = saved
    if source is None:
        if context.is_main:
            logger.info("training a %d-token chat BPE on the rendered conversations", config.tokenizer_vocab_size)
            template = _template_text(config) or VICUNA_V1_CHAT_TEMPLATE  # train_chat_tokenizer's default
            texts = training_texts(records, template)
            trained = train_chat_tokenizer(texts, config.tokenizer_vocab_size, config.max_length)
            trained.save_pretrained(saved)
        context.barrier()
        source = saved
    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab or REGION_TOKEN not in vocab or tokenizer.pad_token is None:
        add_mllm_tokens(tokenizer)
    tokenizer.padding_side = "right"
    return _with_template(tokenizer, config)


def build_processor(
    config: MLLMTrainConfig, model_config: CLOCLlavaConfig, tokenizer: PreTrainedTokenizerBase
) -> CLOCLlavaProcessor:
    """The processor of ``model_config``: the image processor saved with the model or the CLOC encoder when there
    is one (its normalisation), else the one for the config; ``resize_mode`` from the train config when set."""
    image_processor = None
    for folder in (config.model_path, config.vision_tower):
        if folder and (Path(folder) / "preprocessor_config.json").is_file():
            image_processor = CLOCImageProcessor.from_pretrained(folder)
            break
    if image_processor is None:
        image_processor = CLOCImageProcessor.for_model(model_config.vision_config)
    if image_processor.image_size != model_config.vision_config.vision_config.image_size:
        raise ConfigError(
            f"the image processor's image_size {image_processor.image_size} does not match the vision tower's "
            f"{model_config.vision_config.vision_config.image_size}"
        )
    if config.resize_mode is not None:
        image_processor.resize_mode = config.resize_mode
    return CLOCLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=model_config.image_seq_length,
        box_codec=model_config.box_codec,
    )


# ----- the model -----------------------------------------------------------------------------------------------------


def has_seeded_parts(config: MLLMTrainConfig) -> bool:
    """Whether the base has parts initialised from ``init_seed`` (a tiny vision tower or LLM) rather than loaded."""
    return not config.model_path and not (config.vision_tower and config.language_model)


def model_source(config: MLLMTrainConfig, tokenizer: PreTrainedTokenizerBase, zero3: bool = False) -> dict[str, Any]:
    """What determines the frozen base of a run (recorded next to the projector; compared when stage 2 loads it).
    ``zero3``: the base is built under ZeRO-3, whose initialisation of seeded parts differs (see the module doc)."""
    source: dict[str, Any] = {
        "model_path": config.model_path,
        "vision_tower": config.vision_tower,
        "language_model": config.language_model,
        "model_overrides": config.model_overrides,
        "init_seed": config.init_seed,
        "vocab_size": len(tokenizer),
    }
    if zero3 and has_seeded_parts(config):
        source["seeded_init"] = "zero3"
    return source


def planned_text_config(config: MLLMTrainConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The language model's config as :func:`assemble_model` will build it, read without building anything (to
    size DeepSpeed buckets before the model exists)."""
    if config.model_path:
        return CLOCLlavaConfig.from_pretrained(config.model_path).text_config
    if config.language_model:
        return AutoConfig.from_pretrained(config.language_model).get_text_config()
    overrides = copy.deepcopy(config.model_overrides)
    return tiny_config(tokenizer, text_config=overrides.get("text_config") or {}).text_config


def load_dtype(config: MLLMTrainConfig, precision: str) -> torch.dtype:
    """Weights are loaded in bf16 with ``precision=bf16`` (half the memory of the frozen parts); without DeepSpeed
    the trainer then puts the trained parameters back in fp32 (:func:`upcast_trainable`) and runs under autocast,
    while DeepSpeed keeps bf16 weights with fp32 master copies itself."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def upcast_trainable(module: nn.Module) -> None:
    """Trained parameters in fp32 (the optimizer updates them there); frozen ones keep their dtype."""
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def _new_projectors(
    model: CLOCLlavaForConditionalGeneration, seed: int, dtype: torch.dtype, ds_config: dict[str, Any] | None
) -> None:
    """Fresh image and region projectors from ``seed`` (torch's default init), partitioned under ZeRO-3 (where
    ``zero.Init`` gives them the config's dtype; fp32 values equal the non-ZeRO ones)."""
    config = model.config
    hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
    torch.manual_seed(seed)
    with zero_init(ds_config):
        image = CLOCLlavaProjector(config.image_projector_input_size, hidden, config.projector_type, bias)
        region = CLOCLlavaProjector(config.region_feature_size, hidden, config.region_projector_type, bias)
    if not is_zero3(ds_config):
        image, region = image.to(dtype), region.to(dtype)
    model.model.multi_modal_projector, model.model.region_projector = image, region


def _seeded(module: nn.Module, dtype: torch.dtype, sharded: bool) -> nn.Module:
    """A module just built from a config in ``dtype`` (under ZeRO-3 ``zero.Init`` has set the dtype already)."""
    return module if sharded else module.to(dtype)


def assemble_model(
    config: MLLMTrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    ds_config: dict[str, Any] | None = None,
) -> CLOCLlavaForConditionalGeneration:
    """The initial model (before the stage-1 projector and before LoRA), see the module docstring.

    ``ds_config``: the filled DeepSpeed config of the run; under ZeRO-3 the model comes back partitioned (every
    parameter a ZeRO-3 parameter holding this rank's slice) and ``dtype`` must be the config's (bf16 or fp32).
    """
    attn = config.attn_implementation
    overrides = copy.deepcopy(config.model_overrides)
    sharded = is_zero3(ds_config)
    if config.model_path:
        with sharded_build(ds_config):
            model = CLOCLlavaForConditionalGeneration.from_pretrained(
                config.model_path, dtype=dtype, attn_implementation=attn
            )
        for key in differing_overrides(model.config, overrides):
            logger.warning("model_overrides.%s is ignored: the model comes from model_path", key)
    else:
        tower, llm = None, None
        with sharded_build(ds_config):
            if config.vision_tower:
                tower = CLOCVisionTower.from_cloc(config.vision_tower, dtype=dtype)
            if config.language_model:
                llm = AutoModelForCausalLM.from_pretrained(config.language_model, dtype=dtype, attn_implementation=attn)
        vision_overrides = overrides.pop("vision_config", None)
        text_overrides = overrides.pop("text_config", None)
        if (tower and vision_overrides) or (llm and text_overrides):
            raise ConfigError("model_overrides.vision_config / text_config only apply to a tiny (not loaded) part")
        tiny = tiny_config(
            tokenizer, vision_config=vision_overrides or {}, text_config=text_overrides or {}, **overrides
        )
        model_config = CLOCLlavaConfig(
            vision_config=tower.config if tower is not None else tiny.vision_config,
            text_config=llm.config if llm is not None else tiny.text_config,
            image_token_id=tiny.image_token_id,
            region_token_id=tiny.region_token_id,
            **overrides,
        )
        if llm is None:
            torch.manual_seed(config.init_seed)
            with sharded_build(ds_config):
                model = CLOCLlavaForConditionalGeneration._from_config(model_config, attn_implementation=attn)
            model = _seeded(model, dtype, sharded)
            if tower is not None:
                model.model.vision_tower = tower
        else:
            with torch.device("meta"):  # a shell (outside the DeepSpeed integration: zero.Init cannot build on meta)
                model = CLOCLlavaForConditionalGeneration._from_config(model_config, attn_implementation=attn)
            model.model.language_model = getattr(llm, llm.base_model_prefix)
            model.lm_head = llm.get_output_embeddings()
            if tower is None:
                torch.manual_seed(config.init_seed)
                with sharded_build(ds_config):
                    tower = CLOCVisionTower._from_config(model_config.vision_config, attn_implementation=attn)
                tower = _seeded(tower, dtype, sharded)
            model.model.vision_tower = tower
            _new_projectors(model, config.init_seed, dtype, ds_config)
            meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
            if meta:
                raise RuntimeError(f"assembling the model left weights uninitialised: {meta[:5]}")
    if len(tokenizer) > model.config.text_config.vocab_size:
        torch.manual_seed(config.init_seed)
        with sharded_build(ds_config):  # transformers gathers the old rows and builds the new matrices whole ...
            model.resize_token_embeddings(len(tokenizer))
        partition_remaining(model, ds_config)  # ... which are partitioned here, before anything else is built
    for key in ("image_token_id", "region_token_id"):
        expected = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN if key == "image_token_id" else REGION_TOKEN)
        if getattr(model.config, key) != expected:
            if config.model_path:
                raise ConfigError(
                    f"{config.model_path}: config.{key}={getattr(model.config, key)} but the tokenizer gives {expected}"
                )
            setattr(model.config, key, expected)
    model.config.use_cache = False
    return model


def base_is_model_path(config: MLLMTrainConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a LoRA run's frozen base is exactly ``model_path`` on disk (no stage-1 projector loaded on top and no
    vocabulary growth); otherwise the trainer writes it to ``output_dir/base_model``."""
    if not config.model_path or config.pretrain_mm_projector:
        return False
    return len(tokenizer) <= CLOCLlavaConfig.from_pretrained(config.model_path).text_config.vocab_size


def save_base_model(
    model: CLOCLlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    processor: Any,
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the frozen base of a LoRA run (what ``train.mllm.merge_lora`` merges into) atomically; ``state_dict``: the
    gathered weights of a partitioned model (:func:`train.mllm.zero3.gathered_state_dict`)."""
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def differing_overrides(model_config: Any, overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the ``model_overrides`` that ``model_config`` (a loaded model's config) does not already
    hold: those a ``model_path`` run ignores. A config that inherits the overrides its model was built with (a later
    phase of a recipe) has none."""
    differing = []
    for key, value in overrides.items():
        current = getattr(model_config, key, None)
        if isinstance(value, Mapping) and current is not None and not isinstance(current, Mapping):
            differing.extend(differing_overrides(current, value, f"{prefix}{key}."))
        elif current != value:
            differing.append(f"{prefix}{key}")
    return differing


def build_model(
    config: MLLMTrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    processor_factory: Any,
    context: DistributedContext,
    precision: str,
    ds_config: dict[str, Any] | None = None,
) -> tuple[CLOCLlavaForConditionalGeneration, Any, Path | None]:
    """``(model, processor, base_dir)``: the model with the stage-1 projector loaded (not yet LoRA-wrapped);
    partitioned under a ZeRO-3 ``ds_config`` (the filled dict the engine gets; see :func:`assemble_model`).

    ``base_dir`` is the folder a LoRA run's adapter applies to (``model_path`` when the base is exactly that folder,
    else ``output_dir/base_model``, written once by rank 0); ``None`` without LoRA. With ``bits`` the base is
    written in full precision and reloaded quantised through :func:`mllm.loading.load_pretrained_model`.
    """
    dtype = load_dtype(config, precision)
    if config.bits is not None:
        try:
            quantization_config_for(config.bits)
        except (ImportError, RuntimeError) as error:
            raise ConfigError(f"QLoRA (bits={config.bits}): {error}") from error
        if config.deepspeed and _zero_stage(config.deepspeed) == 3:
            raise ConfigError("QLoRA (bits=4/8) does not work with ZeRO-3; use zero2.json or no DeepSpeed")
    base_dir = None
    if config.lora:
        base_dir = Path(config.model_path) if base_is_model_path(config, tokenizer) else None
        base_dir = base_dir or Path(config.output_dir) / BASE_MODEL_DIR

    def initial_model() -> CLOCLlavaForConditionalGeneration:
        model = assemble_model(config, tokenizer, dtype, ds_config)
        if config.pretrain_mm_projector:
            source = model_source(config, tokenizer, zero3=is_zero3(ds_config))
            load_projector(model, config.pretrain_mm_projector, expected_source=source)
        return model

    if config.bits is None:
        model = initial_model()
        processor = processor_factory(model.config)
        if base_dir is not None:
            if _must_write_base(base_dir, context):
                state = gathered_state_dict(model, keep=context.is_main) if is_zero3(ds_config) else None
                if context.is_main:
                    save_base_model(model, tokenizer, processor, base_dir, state_dict=state)
            context.barrier()
        return model, processor, base_dir
    if context.is_main and base_dir.name == BASE_MODEL_DIR and not (base_dir / "config.json").is_file():
        full = initial_model()
        save_base_model(full, tokenizer, processor_factory(full.config), base_dir)
        del full
    context.barrier()
    device_map = {"": context.device.index or 0} if context.device.type == "cuda" else {"": "cpu"}
    model = load_pretrained_model(
        base_dir, bits=config.bits, attn_implementation=config.attn_implementation, device_map=device_map
    )
    model.config.use_cache = False
    return model, processor_factory(model.config), base_dir


def _must_write_base(base_dir: Path, context: DistributedContext) -> bool:
    """Whether ``output_dir/base_model`` is still to be written, as rank 0 sees it (every rank gets the same answer:
    under ZeRO-3 writing it is collective)."""
    missing = base_dir.name == BASE_MODEL_DIR and not (base_dir / "config.json").is_file()
    return context.reduce({"missing": float(missing and context.is_main)}, op="max")["missing"] > 0


def _zero_stage(path: str) -> int:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return int(data.get("zero_optimization", {}).get("stage", 0))


__all__ = [
    "BASE_MODEL_DIR",
    "assemble_model",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "differing_overrides",
    "has_seeded_parts",
    "model_source",
    "planned_text_config",
    "save_base_model",
    "upcast_trainable",
]
