"""Build the pieces of an MLLM training run from its config: tokenizer, processor, model, trainable parameters,
LoRA / QLoRA, the stage-1 projector, optimizer parameter groups.

The model comes from one of:

- ``model_path``: a CLOC-LLaVA folder (``save_pretrained`` of :class:`~mllm.CLOCLlavaForConditionalGeneration`);
- ``vision_tower`` (a CLOC encoder folder) and/or ``language_model`` (a causal-LM folder): assembled without
  initialising the loaded parts twice (the composite is built on the ``meta`` device and the loaded modules put in
  place); a part not given is the tiny one of :mod:`mllm.tiny`, and every new weight (projectors, tiny parts) comes
  from ``init_seed``, so stage 2 rebuilds exactly the frozen base stage 1 trained its projector against.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from cloc_encoder.image_processing import CLOCImageProcessor
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, CLOCVisionTower
from mllm.chat_template import VICUNA_SYSTEM_PROMPT, VICUNA_V1_CHAT_TEMPLATE
from mllm.loading import load_pretrained_model, quantization_config_for
from mllm.modeling_cloc_llava import CLOCLlavaProjector
from mllm.tiny import TINY_CORPUS, tiny_config
from mllm.tokenization import IMAGE_TOKEN, REGION_TOKEN, add_mllm_tokens, train_chat_tokenizer
from train.cloc_config import ConfigError
from train.mllm_config import MLLMTrainConfig
from train.mllm_conversations import ConversationRecord
from train.runtime import DistributedContext

logger = logging.getLogger(__name__)

MM_PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "model.region_projector.")
TOKENIZER_DIR = "tokenizer"
BASE_MODEL_DIR = "base_model"
UNUSED_PROMPTER_PARTS = ("text_projection",)
"""Prompter parts the MLLM never uses (text prompts); kept frozen when the prompter is tuned."""
UNUSED_VISION_PARTS = ("post_layernorm", "head")
"""ViT parts whose output the MLLM does not read (the pooled output); kept frozen when the ViT is tuned."""


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


def training_texts(records: Sequence[ConversationRecord]) -> list[str]:
    """The tiny tokenizer's training corpus: the tiny corpus of chat and box text, then every turn's text and, for
    each conversation without a system turn, the default system prompt (as often as the rendered conversations hold
    it, so the BPE learns it: 127 tokens → 29 on the synthetic world)."""
    texts = list(TINY_CORPUS)
    for record in records:
        if record.turns[0][0] != "system":
            texts.append(VICUNA_SYSTEM_PROMPT)
        texts.extend(text for _, text in record.turns)
    return texts


def _with_template(tokenizer: PreTrainedTokenizerBase, config: MLLMTrainConfig) -> PreTrainedTokenizerBase:
    if config.chat_template == "vicuna_v1":
        tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE
    elif config.chat_template:
        path = Path(config.chat_template)
        if not path.is_file():
            raise ConfigError(f"chat_template={config.chat_template!r}: not 'vicuna_v1' nor a Jinja template file")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
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
            logger.info("training a %d-token chat BPE on the training texts", config.tokenizer_vocab_size)
            trained = train_chat_tokenizer(training_texts(records), config.tokenizer_vocab_size, config.max_length)
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


def model_source(config: MLLMTrainConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What determines the frozen base of a run (recorded next to the projector; compared when stage 2 loads it)."""
    return {
        "model_path": config.model_path,
        "vision_tower": config.vision_tower,
        "language_model": config.language_model,
        "model_overrides": config.model_overrides,
        "init_seed": config.init_seed,
        "vocab_size": len(tokenizer),
    }


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


def _new_projectors(model: CLOCLlavaForConditionalGeneration, seed: int, dtype: torch.dtype) -> None:
    config = model.config
    hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
    torch.manual_seed(seed)
    model.model.multi_modal_projector = CLOCLlavaProjector(
        config.vision_config.vision_width, hidden, config.projector_type, bias
    ).to(dtype)
    model.model.region_projector = CLOCLlavaProjector(
        config.region_feature_size, hidden, config.region_projector_type, bias
    ).to(dtype)


def assemble_model(
    config: MLLMTrainConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32
) -> CLOCLlavaForConditionalGeneration:
    """The initial model (before the stage-1 projector and before LoRA), see the module docstring."""
    attn = config.attn_implementation
    overrides = copy.deepcopy(config.model_overrides)
    if config.model_path:
        model = CLOCLlavaForConditionalGeneration.from_pretrained(
            config.model_path, dtype=dtype, attn_implementation=attn
        )
        for key in overrides:
            logger.warning("model_overrides.%s is ignored: the model comes from model_path", key)
    else:
        tower = CLOCVisionTower.from_cloc(config.vision_tower, dtype=dtype) if config.vision_tower else None
        llm = None
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
            model = CLOCLlavaForConditionalGeneration._from_config(model_config, attn_implementation=attn).to(dtype)
            if tower is not None:
                model.model.vision_tower = tower
        else:
            with torch.device("meta"):
                model = CLOCLlavaForConditionalGeneration._from_config(model_config, attn_implementation=attn)
            model.model.language_model = getattr(llm, llm.base_model_prefix)
            model.lm_head = llm.get_output_embeddings()
            if tower is None:
                torch.manual_seed(config.init_seed)
                tower = CLOCVisionTower._from_config(model_config.vision_config, attn_implementation=attn).to(dtype)
            model.model.vision_tower = tower
            _new_projectors(model, config.init_seed, dtype)
            meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
            if meta:
                raise RuntimeError(f"assembling the model left weights uninitialised: {meta[:5]}")
    if len(tokenizer) > model.config.text_config.vocab_size:
        torch.manual_seed(config.init_seed)
        model.resize_token_embeddings(len(tokenizer))
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
    model: CLOCLlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, processor: Any, folder: Path
) -> Path:
    """Write the frozen base of a LoRA run (what ``train.merge_lora`` merges into) atomically."""
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def build_model(
    config: MLLMTrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    processor_factory: Any,
    context: DistributedContext,
    precision: str,
) -> tuple[CLOCLlavaForConditionalGeneration, Any, Path | None]:
    """``(model, processor, base_dir)``: the model with the stage-1 projector loaded (not yet LoRA-wrapped).

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
        model = assemble_model(config, tokenizer, dtype)
        if config.pretrain_mm_projector:
            load_projector(model, config.pretrain_mm_projector, expected_source=model_source(config, tokenizer))
        return model

    if config.bits is None:
        model = initial_model()
        processor = processor_factory(model.config)
        if base_dir is not None:
            if context.is_main and base_dir.name == BASE_MODEL_DIR:
                save_base_model(model, tokenizer, processor, base_dir)
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


def _zero_stage(path: str) -> int:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return int(data.get("zero_optimization", {}).get("stage", 0))


# ----- the stage-1 projector -----------------------------------------------------------------------------------------


def projector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Both projectors' weights under their names in the full model (``model.multi_modal_projector.*``, ...)."""
    inner = unwrap(model)
    state = {}
    for prefix, module in (
        ("model.multi_modal_projector.", inner.model.multi_modal_projector),
        ("model.region_projector.", inner.model.region_projector),
    ):
        for name, tensor in module.state_dict().items():
            state[prefix + name] = tensor
    return state


def save_projector(state: dict[str, torch.Tensor], path: Path, source: dict[str, Any] | None = None) -> None:
    """Write ``mm_projector.safetensors`` (projector weights only) with the base it was trained against."""
    metadata = {"format": "cloc-llava-projector"}
    if source is not None:
        metadata["model_source"] = json.dumps(source, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


def load_projector(
    model: nn.Module, path: str | os.PathLike[str], expected_source: dict[str, Any] | None = None
) -> None:
    """Load stage 1's projector weights (a ``mm_projector.safetensors`` file, or a folder holding one).

    The image projector is required; a missing region projector is a warning (e.g. a projector from plain LLaVA).
    Shapes must match. A different recorded base (``model_source``) is a warning: the projector was aligned to
    another LLM or vision tower.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MM_PROJECTOR_FILE
    if not file.is_file():
        raise ConfigError(f"pretrain_mm_projector={path}: no {MM_PROJECTOR_FILE} there")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    expected = projector_state(model)
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ConfigError(f"{file}: keys that are not projector weights of this model: {unknown[:5]}")
    missing = sorted(set(expected) - set(state))
    if any(key.startswith(PROJECTOR_PREFIXES[0]) for key in missing):
        raise ConfigError(f"{file}: the image projector weights are missing: {missing[:5]}")
    if missing:
        logger.warning("%s has no region projector weights; the region projector starts fresh", file)
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ConfigError(
                f"{file}: {key} has shape {tuple(tensor.shape)} but this model needs {tuple(expected[key].shape)} "
                "(another LLM or vision tower?)"
            )
    recorded = metadata.get("model_source")
    if (
        expected_source is not None
        and recorded is not None
        and json.loads(recorded) != json.loads(json.dumps(expected_source))
    ):
        logger.warning("%s was trained against another base (%s) than this run's (%s)", file, recorded, expected_source)
    inner = unwrap(model)
    with torch.no_grad():
        for key, tensor in state.items():
            target = inner.get_parameter(key)
            target.copy_(tensor.to(target.dtype))
    logger.info("loaded the stage-1 projector from %s", file)


# ----- what trains ---------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> CLOCLlavaForConditionalGeneration:
    """The :class:`CLOCLlavaForConditionalGeneration` inside a PEFT / DDP / DeepSpeed wrapper."""
    while not isinstance(model, CLOCLlavaForConditionalGeneration):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"no CLOCLlavaForConditionalGeneration inside {type(model).__name__}")
    return model


def lora_target_modules(model: CLOCLlavaForConditionalGeneration, suffixes: str | None = None) -> list[str]:
    """Full names of the LLM's linear layers (quantised ones included) to put LoRA adapters on; ``suffixes``
    (comma-separated, e.g. ``"q_proj,v_proj"``) keeps those whose last name part is listed."""
    wanted = {s.strip() for s in suffixes.split(",") if s.strip()} if suffixes else None
    names = []
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, nn.Linear) and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            names.append(f"model.language_model.{name}")
    if not names:
        raise ConfigError(f"lora_target_modules={suffixes!r} matches no linear layer of the language model")
    return names


def apply_lora(model: CLOCLlavaForConditionalGeneration, config: MLLMTrainConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on the LLM (PEFT); QLoRA prepares the quantised model first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.bits is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_target_modules),
        bias="none",
    )
    return get_peft_model(model, lora_config)


def configure_trainable(module: nn.Module, config: MLLMTrainConfig) -> dict[str, int]:
    """Set ``requires_grad`` for the stage; returns trainable parameter counts per group.

    Always: both projectors. Stage 2: the LLM (all of it, or only the LoRA adapters when ``module`` is a PEFT
    model). ``tune_prompter``: the prompter except its text-prompt projection (and its embedding projection when
    the region projector reads the pooled output). ``tune_vision_tower``: the ViT except its pooled-output head.
    """
    model = unwrap(module)
    lora = module is not model
    for name, parameter in module.named_parameters():
        parameter.requires_grad = lora and "lora_" in name and config.stage == 2
    parts = [model.model.multi_modal_projector, model.model.region_projector]
    if config.stage == 2 and not lora:
        parts += [model.model.language_model, model.lm_head]
    for part in parts:
        for parameter in part.parameters():
            parameter.requires_grad = True
    tower = model.model.vision_tower
    if config.tune_prompter:
        unused = set(UNUSED_PROMPTER_PARTS) | ({"projection"} if model.config.region_feature == "pooled" else set())
        for name, child in tower.prompter.named_children():
            if name not in unused:
                child.requires_grad_(True)
        for parameter in tower.prompter.parameters(recurse=False):
            parameter.requires_grad = True
    if config.tune_vision_tower:
        for name, parameter in tower.vision_model.named_parameters():
            parameter.requires_grad = not any(f".{part}." in f".{name}" for part in UNUSED_VISION_PARTS)
    counts = {group: 0 for group in ("projector", "vision", "llm")}
    for parameter_group, parameter in classify(module):
        if parameter.requires_grad:
            counts[parameter_group] += parameter.numel()
    return counts


def classify(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(group, parameter)`` for every parameter: ``projector`` (both projectors), ``vision`` (ViT + prompter) or
    ``llm`` (language model, LM head, LoRA adapters)."""
    model = unwrap(module)
    projector = {
        id(p) for m in (model.model.multi_modal_projector, model.model.region_projector) for p in m.parameters()
    }
    vision = {id(p) for p in model.model.vision_tower.parameters()}
    result = []
    for parameter in module.parameters():
        group = "projector" if id(parameter) in projector else "vision" if id(parameter) in vision else "llm"
        result.append((group, parameter))
    return result


def parameter_groups(module: nn.Module, config: MLLMTrainConfig) -> tuple[list[dict[str, Any]], list[float]]:
    """Optimizer groups of the trainable parameters and their peak lrs: per part (LLM ``lr``, projectors
    ``projector_lr``, vision ``vision_tower_lr``) × weight decay (matrices only)."""
    peaks = {
        "llm": config.peak_lr(),
        "projector": config.peak_projector_lr(),
        "vision": config.vision_tower_lr or config.peak_lr(),
    }
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for group, parameter in classify(module):
        if parameter.requires_grad:
            buckets.setdefault((group, parameter.ndim >= 2), []).append(parameter)
    groups, lrs = [], []
    for (group, decay), params in sorted(buckets.items(), key=lambda item: (item[0][0], not item[0][1])):
        groups.append(
            {"params": params, "lr": peaks[group], "weight_decay": config.weight_decay if decay else 0.0, "name": group}
        )
        lrs.append(peaks[group])
    if not groups:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    return groups, lrs


def build_optimizer(groups: list[dict[str, Any]], config: MLLMTrainConfig) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam (``optimizer=cpu_adam``, for ZeRO optimizer offload on GPUs)."""
    clean = [{k: v for k, v in group.items() if k != "name"} for group in groups]
    if config.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, lr=clean[0]["lr"], betas=config.betas, eps=config.eps, adamw_mode=True)
    return torch.optim.AdamW(clean, lr=clean[0]["lr"], betas=config.betas, eps=config.eps)


__all__ = [
    "BASE_MODEL_DIR",
    "MM_PROJECTOR_FILE",
    "apply_lora",
    "assemble_model",
    "build_model",
    "build_optimizer",
    "build_processor",
    "build_tokenizer",
    "classify",
    "configure_trainable",
    "load_projector",
    "lora_target_modules",
    "model_source",
    "parameter_groups",
    "projector_state",
    "save_base_model",
    "save_projector",
    "unwrap",
    "upcast_trainable",
]
