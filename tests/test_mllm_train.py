"""MLLM training: stage 1 (projectors only), stage 2 (LoRA, full + prompter), exact resume, LoRA merge, QLoRA
checks, unreadable images, and stage 1 → stage 2 under DeepSpeed with 2 CPU processes (gloo)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

import mllm
from cloc_encoder.data.format import read_region_text
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor
from tests.tiny_training import run_two_ranks
from train.config import ConfigError
from train.metrics import read_metrics
from train.mllm.build import assemble_model
from train.mllm.config import MLLMTrainConfig, load_mllm_config
from train.mllm.conversations import conversations_from_records, write_conversations
from train.mllm.merge_lora import load_lora_model
from train.mllm.merge_lora import main as merge_main
from train.mllm.projector import PROJECTOR_PREFIXES
from train.mllm.train import main, train_mllm
from train.mllm.trainable import unwrap
from train.runtime import deepspeed_config

REPO = Path(__file__).resolve().parents[1]


def _conversations(world: Path, out: Path, **options) -> Path:
    records = read_region_text(world / "train.jsonl")
    samples = conversations_from_records(records, out_dir=out.parent, **options)
    write_conversations(samples, out)
    return out


@pytest.fixture(scope="module")
def data(world):
    return _conversations(world, world / "conv" / "train.json", tasks=["grounding", "referring", "caption"])


def _config(data: Path, output_dir: Path, **values) -> MLLMTrainConfig:
    settings = {
        "train_data": str(data),
        "output_dir": str(output_dir),
        "batch_size": 4,
        "max_steps": 3,
        "log_every": 1,
        "save_every": 0,
        "max_length": 256,
        "tokenizer_vocab_size": 320,
        "progress_bar": False,
        "tensorboard": False,
        "device": "cpu",
    }
    settings.update(values)
    return MLLMTrainConfig(**settings)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


@pytest.fixture(scope="module")
def stage1(data, world, tmp_path_factory):
    records = read_region_text(world / "val.jsonl")
    val = world / "conv" / "val.json"
    write_conversations(conversations_from_records(records, out_dir=val.parent, tasks=["grounding"]), val)
    return train_mllm(_config(data, tmp_path_factory.mktemp("stage1"), stage=1, lr=1e-2, val_data=str(val)))


@pytest.fixture(scope="module")
def stage2_lora(data, stage1, tmp_path_factory):
    config = _config(
        data,
        tmp_path_factory.mktemp("stage2"),
        stage=2,
        lora=True,
        lora_r=4,
        lora_alpha=8,
        lr=2e-2,
        pretrain_mm_projector=str(stage1.mm_projector),
    )
    return train_mllm(config), config


def _inputs(processor, question: str = "What is [100, 200, 600, 700] <region>?"):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=[Image.new("RGB", (40, 32), (200, 40, 40))], text=[prompt])


# ----- config --------------------------------------------------------------------------------------------------------


def test_shipped_configs_validation_and_deepspeed_files(tmp_path):
    stage1 = load_mllm_config(REPO / "train/configs/mllm_stage1.yaml").validate()
    assert stage1.stage == 1 and stage1.peak_lr() == 1e-3 and stage1.num_epochs == 1
    stage2 = load_mllm_config(REPO / "train/configs/mllm_stage2.yaml").validate()
    assert stage2.stage == 2 and stage2.peak_lr() == 2e-5 and stage2.pretrain_mm_projector
    lora = load_mllm_config(REPO / "train/configs/mllm_stage2.yaml", ["lora=true", "bits=4"]).validate()
    assert lora.peak_lr() == 2e-4 and lora.peak_projector_lr() == 2e-5
    for overrides, message in [
        (["stage=3"], "'stage' must be 1 or 2"),
        (["stage=1", "lora=true"], "lora and bits are for stage 2"),
        (["bits=4"], "set lora=true"),
        (["lora=true", "bits=3"], "must be 4 or 8"),
        (["model_path=x", "vision_tower=y"], "either model_path"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_mllm_config(REPO / "train/configs/mllm_stage2.yaml", overrides).validate()
    with pytest.raises(ConfigError, match="did you mean 'lora_r'"):
        load_mllm_config(None, ["lora_rr=8"])
    config = MLLMTrainConfig(train_data="x", batch_size=4, gradient_accumulation_steps=2, precision="bf16")
    hidden = {
        "zero_optimization.reduce_bucket_size": 16,
        "zero_optimization.stage3_prefetch_bucket_size": 14,
        "zero_optimization.stage3_param_persistence_threshold": 40,
    }
    for name in ("zero3.json", "zero3_offload.json"):
        filled = deepspeed_config(REPO / "train/deepspeed" / name, config, world_size=8, auto_values=hidden)
        zero = filled["zero_optimization"]
        assert (
            zero["stage"] == 3 and zero["reduce_bucket_size"] == 16 and zero["stage3_param_persistence_threshold"] == 40
        )
        assert filled["train_batch_size"] == 64 and filled["bf16"]["enabled"] is True
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        with pytest.raises(ConfigError, match="'auto' is not a DeepSpeed value"):
            deepspeed_config(REPO / "train/deepspeed" / name, config, world_size=8)
    assert "offload_optimizer" in filled["zero_optimization"] and filled["zero_force_ds_cpu_optimizer"] is False


# ----- stage 1 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "device", "cpu_units", "gpu_bf16", "expected"),
    [
        ("fp32", "cpu", True, False, "fp32"),
        ("bf16", "cpu", False, False, "bf16"),  # asked for: emulated where the CPU has no bf16 units
        ("auto", "cpu", True, False, "fp32"),  # auto keeps CPUs in fp32
        ("bf16_if_native", "cpu", True, False, "bf16"),
        ("bf16_if_native", "cpu", False, False, "fp32"),
        ("auto", "cuda", False, True, "bf16"),
        ("auto", "cuda", False, False, "fp32"),
        ("bf16_if_native", "cuda", False, True, "bf16"),
        ("bf16_if_native", "cuda", False, False, "fp32"),
    ],
)
def test_precision_selection(monkeypatch, precision, device, cpu_units, gpu_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpu_units, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: gpu_bf16)
    config = MLLMTrainConfig(train_data="x", precision=precision, device=device)
    assert config.resolved_precision() == expected
    # the tiny recipe asks for bf16 where the hardware has it
    tiny = load_mllm_config(REPO / "train/configs/mllm_tiny_stage2.yaml", [f"device={device}"])
    assert tiny.resolved_precision() == ("bf16" if (cpu_units if device == "cpu" else gpu_bf16) else "fp32")


def test_stage1_changes_only_the_projectors_and_writes_them(stage1, data):
    assert stage1.step == 3 and stage1.stage == 1
    assert stage1.trainable_parameters["vision"] == 0 and stage1.trainable_parameters["llm"] == 0
    records = [r for r in read_metrics(stage1.output_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["supervised_tokens"] > 0 for r in records)
    assert math.isfinite(stage1.val_metrics["val_loss"]) and stage1.val_metrics["step"] == 3

    config = _config(data, stage1.output_dir, stage=1)
    tokenizer = AutoTokenizer.from_pretrained(stage1.output_dir / "tokenizer")
    initial = _state(assemble_model(config, tokenizer))  # the same frozen base, rebuilt from init_seed
    trained = _state(stage1.model)
    assert initial.keys() == trained.keys()
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed and all(k.startswith(PROJECTOR_PREFIXES) for k in changed)
    assert any(k.startswith(PROJECTOR_PREFIXES[1]) for k in changed)  # the region projector learned too
    assert {k for k in initial if k.startswith(PROJECTOR_PREFIXES)} == set(load_file(str(stage1.mm_projector)))

    checkpoint = stage1.checkpoint
    assert checkpoint.name == "step-000003" and not (checkpoint / "model.safetensors").exists()
    projector = load_file(str(checkpoint / "mm_projector.safetensors"))
    assert all(torch.equal(projector[k], trained[k]) for k in projector)
    assert set(load_file(str(checkpoint / "trainable.safetensors"))) == set(projector)
    assert load_file(str(stage1.mm_projector)).keys() == projector.keys()


# ----- stage 2 -------------------------------------------------------------------------------------------------------


def test_stage2_lora_starts_from_the_stage1_projector(stage1, stage2_lora):
    result, _ = stage2_lora
    assert result.step == 3 and result.trainable_parameters["llm"] > 0 and result.trainable_parameters["vision"] == 0
    assert not (result.output_dir / "tokenizer").exists()  # stage 1's tokenizer was reused
    base = _state(CLOCLlavaForConditionalGeneration.from_pretrained(result.output_dir / "base_model"))
    after_stage1 = _state(stage1.model)
    assert base.keys() == after_stage1.keys()
    assert all(torch.equal(base[k], after_stage1[k]) for k in base)  # stage 1's model, projector included

    trained = dict(result.model.named_parameters())
    lora_b = [p for name, p in trained.items() if "lora_B" in name]
    assert lora_b and all(bool((p != 0).any()) for p in lora_b)  # LoRA B starts at 0
    for name, parameter in unwrap(result.model).named_parameters():
        if "lora_" in name or "base_layer" in name:
            continue
        if name.startswith(PROJECTOR_PREFIXES):
            assert not torch.equal(parameter, base[name]), name
        else:
            assert torch.equal(parameter, base[name]), name
    for name, module in unwrap(result.model).named_modules():
        if hasattr(module, "base_layer"):  # frozen base weight under each adapter
            assert torch.equal(module.base_layer.weight, base[f"{name}.weight"])
            assert name.startswith("model.language_model.")

    checkpoint = result.checkpoint
    for file in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "non_lora_trainables.safetensors",
        "mm_projector.safetensors",
        "tokenizer_config.json",
        "processor_config.json",
    ):
        assert (checkpoint / file).is_file(), file
    assert json.loads((checkpoint / "lora_info.json").read_text())["base_model"] == str(
        (result.output_dir / "base_model").resolve()
    )
    assert set(load_file(str(checkpoint / "non_lora_trainables.safetensors"))) == set(
        load_file(str(checkpoint / "mm_projector.safetensors"))
    )


def test_merge_lora_equals_the_lora_model(stage2_lora, tmp_path):
    result, _ = stage2_lora
    out = tmp_path / "merged"
    assert merge_main(["--lora", str(result.checkpoint), "--out", str(out)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(merged) is CLOCLlavaForConditionalGeneration and not any("lora" in k for k in merged.state_dict())
    processor = CLOCLlavaProcessor.from_pretrained(out)
    inputs = _inputs(processor)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        lora_logits = load_lora_model(result.checkpoint)(**inputs).logits
        trained_logits = result.model.eval()(**inputs).logits
        base_logits = CLOCLlavaForConditionalGeneration.from_pretrained(result.output_dir / "base_model")(
            **inputs
        ).logits
    assert (merged_logits - lora_logits).abs().max() < 1e-5
    assert (merged_logits - trained_logits).abs().max() < 1e-5
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter and the projectors did change the model
    assert merge_main(["--lora", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_stage2_full_with_prompter_and_gradient_checkpointing(stage1, data, tmp_path):
    config = _config(
        data,
        tmp_path / "full",
        stage=2,
        max_steps=2,
        lr=1e-2,
        tune_prompter=True,
        gradient_checkpointing=True,
        pretrain_mm_projector=str(stage1.checkpoint),
        save_every=1,
        keep_last=1,
    )
    result = train_mllm(config)
    assert result.trainable_parameters["llm"] > 0 and result.trainable_parameters["vision"] > 0
    assert [p.name for p in result.output_dir.glob("step-*")] == ["step-000002"]  # keep_last=1
    loaded = AutoModelForImageTextToText.from_pretrained(result.checkpoint)  # a complete model
    before, after = _state(stage1.model), _state(loaded)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prompter = "model.vision_tower.prompter."
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(k.startswith(prompter + "layer.") for k in changed) and prompter + "corner_embeddings" in changed
    assert not any(k.startswith((prompter + "text_projection", prompter + "projection")) for k in changed)
    assert not any(k.startswith("model.vision_tower.vision_model.") for k in changed)
    assert not (result.checkpoint / "trainable.safetensors").exists()


def test_qlora_needs_bitsandbytes_and_a_gpu(data, tmp_path, monkeypatch):
    config = _config(data, tmp_path / "q", stage=2, lora=True, bits=4)
    with pytest.raises(ConfigError, match=r"QLoRA \(bits=4\).*(bitsandbytes|CUDA GPU)"):
        train_mllm(config)
    monkeypatch.setattr(mllm.loading, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(mllm.loading, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train_mllm(_config(data, tmp_path / "q2", stage=2, lora=True, bits=8))


# ----- resume --------------------------------------------------------------------------------------------------------


def test_exact_resume_after_a_kill(data, tmp_path):
    values = {
        "stage": 2,
        "lora": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.2,
        "lr": 1e-2,
        "max_steps": 4,
        "save_every": 2,
        "tensorboard": True,
    }
    straight = train_mllm(_config(data, tmp_path / "straight", **values))
    expected = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    assert [r["step"] for r in expected] == [1, 2, 3, 4]

    class Killed(Exception):
        pass

    def kill_at_step_3(state):
        if state.step == 3:  # after the step-2 checkpoint and the step-3 log line
            raise Killed

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_mllm(_config(data, resumed_dir, **values), step_callback=kill_at_step_3)
    assert (resumed_dir / "latest").read_text().strip() == "step-000002"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_mllm(_config(data, resumed_dir, **values))
    config_path = tmp_path / "resume.yaml"
    _config(data, resumed_dir, **values).save_yaml(config_path)
    assert main(["--config", str(config_path), "--resume"]) == 0

    resumed = [r for r in read_metrics(resumed_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # the killed run's step-3 line was dropped
    for a, b in zip(expected, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    final_a = load_file(str(straight.checkpoint / "trainable.safetensors"))
    final_b = load_file(str(resumed_dir / "step-000004" / "trainable.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy, ignore=shutil.ignore_patterns("conv"))
    records = read_region_text(copy / "train.jsonl")
    (copy / records[5].image).write_bytes(b"not a png")
    (copy / records[9].image).unlink()
    data = _conversations(copy, copy / "caption.json", tasks=["caption"])
    result = train_mllm(_config(data, tmp_path / "out", stage=1, max_steps=8))  # one epoch of 32 captions
    assert result.skipped_images == 2 and math.isfinite(result.metrics["loss"])
    assert json.loads((result.checkpoint / "trainer_state.json").read_text())["skipped_images"] == 2


# ----- DeepSpeed, 2 processes ----------------------------------------------------------------------------------------


def _launch_two(config_path: Path, *extra: str) -> None:
    run_two_ranks([sys.executable, "-m", "train.mllm_train", "--config", str(config_path), *extra], timeout=400)


def test_deepspeed_two_processes_stage1_then_stage2(data, tmp_path):
    """Stage 1 under ZeRO-2, then stage 2 (full fine-tuning) from its projector under ZeRO-3, 2 CPU processes."""
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    first = tmp_path / "stage1.yaml"
    _config(data, stage1_dir, stage=1, deepspeed=str(REPO / "train/deepspeed/zero2.json")).save_yaml(first)
    _launch_two(first)
    records = [r for r in read_metrics(stage1_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    projector = stage1_dir / "mm_projector.safetensors"
    assert projector.is_file() and (stage1_dir / "step-000003" / "deepspeed").is_dir()
    assert {p.name for p in (stage1_dir / "step-000003").glob("rng_state_rank*.json")} == {
        "rng_state_rank0.json",
        "rng_state_rank1.json",
    }

    second = tmp_path / "stage2.yaml"
    _config(
        data,
        stage2_dir,
        stage=2,
        max_steps=2,
        pretrain_mm_projector=str(projector),
        deepspeed=str(REPO / "train/deepspeed/zero3.json"),
    ).save_yaml(second)
    _launch_two(second)
    records = [r for r in read_metrics(stage2_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    model = AutoModelForImageTextToText.from_pretrained(stage2_dir / "step-000002")  # gathered from ZeRO-3 shards
    trained = _state(model)
    stage1_projector = load_file(str(projector))
    assert trained.keys() >= stage1_projector.keys()
    assert all(v.shape == stage1_projector[k].shape for k, v in stage1_projector.items() if k in trained)
    assert any(not torch.equal(trained[k], stage1_projector[k]) for k in stage1_projector)


def test_bf16_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(data, tmp_path):
    result = train_mllm(_config(data, tmp_path / "bf16", stage=1, max_steps=2, precision="bf16"))
    assert math.isfinite(result.metrics["loss"])
    for name, parameter in result.model.named_parameters():
        assert parameter.dtype == (torch.float32 if name.startswith(PROJECTOR_PREFIXES) else torch.bfloat16), name
    # for evaluation the in-memory model is the checkpoint loaded in fp32 (no autocast needed)
    result = train_mllm(_config(data, tmp_path / "bf16_stage2", stage=2, max_steps=2, precision="bf16"))
    assert result.precision == "bf16"
    model = result.inference_model()
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    loaded = CLOCLlavaForConditionalGeneration.from_pretrained(result.checkpoint, dtype=torch.float32).eval()
    inputs = _inputs(CLOCLlavaProcessor.from_pretrained(result.checkpoint))
    with torch.no_grad():
        difference = (model(**inputs).logits - loaded(**inputs).logits).abs().max().item()
    assert difference < 1e-4, difference  # two instances: kernels may sum in another order


def test_model_from_cloc_encoder_and_llm_folders_and_from_model_path(
    tiny_cloc, chat_tokenizer, caption_tokenizer, data, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloc_encoder.distributed import DistributedContext
    from cloc_encoder.image_processing import CLOCImageProcessor
    from train.mllm.build import build_processor, build_tokenizer
    from train.mllm.data import LabelMaskingError

    encoder_dir, llm_dir = tmp_path / "cloc", tmp_path / "llm"
    tiny_cloc.save_pretrained(encoder_dir)
    CLOCImageProcessor(image_size=32, resize_mode="squash").save_pretrained(encoder_dir)
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    torch.manual_seed(1)
    vocab = len(tokenizer) - 2  # the tokenizer grew after the LLM was trained: embeddings are resized
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    config = _config(
        data, tmp_path / "out", stage=1, max_steps=2, vision_tower=str(encoder_dir), language_model=str(llm_dir)
    )
    tokenizer = build_tokenizer(config, [], DistributedContext())
    model = assemble_model(config, tokenizer)
    assert model.config.text_config.vocab_size == len(tokenizer) == vocab + 2
    tower, cloc = model.model.vision_tower.state_dict(), tiny_cloc.state_dict()
    assert all(torch.equal(v, cloc[k]) for k, v in tower.items())
    assembled_llm = model.model.language_model.state_dict()
    for key, value in llm.model.state_dict().items():
        assert torch.equal(assembled_llm[key][:vocab] if key == "embed_tokens.weight" else assembled_llm[key], value)
    assert torch.equal(model.lm_head.weight[:vocab], llm.lm_head.weight)
    processor = build_processor(config, model.config, tokenizer)
    assert processor.image_processor.resize_mode == "squash"  # the encoder's saved image processor
    assert processor.chat_template is not None  # Vicuna v1 for an LLM without a template
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs(processor)).logits).all()

    result = train_mllm(config)  # stage 1 on the assembled model
    assert math.isfinite(result.metrics["loss"]) and not (result.output_dir / "tokenizer").exists()
    model_dir = tmp_path / "cloc-llava"
    unwrap(result.model).save_pretrained(model_dir)
    result.processor.save_pretrained(model_dir)
    again = assemble_model(
        _config(data, tmp_path / "x", model_path=str(model_dir)), AutoTokenizer.from_pretrained(model_dir)
    )
    saved, loaded = _state(result.model), _state(again)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    # A tokenizer that appends </s> to every text (CLIP-style) cannot train a chat model: inference prompts would
    # end in </s>. The first sample fails before any training, naming it.
    caption_tokenizer.save_pretrained(llm_dir)
    with pytest.raises(LabelMaskingError, match=r"sample '.*-grounding-0'.*not a token prefix"):
        train_mllm(_config(data, tmp_path / "eos", stage=1, language_model=str(llm_dir), vision_tower=str(encoder_dir)))


def test_train_stages_chains_the_grounding_phase_into_stage2(data, world, tmp_path, caplog):
    """The recipe's three runs (stage 1, stage 2's grounding phase, stage 2 on the mixed data) chained by
    :func:`train.mllm.stages.train_stages` with the shipped tiny configs: the last run starts from the grounding
    phase's checkpoint (its tower, projectors, LLM and tokenizer) and inherits its settings without warnings."""
    import yaml

    from train.mllm.stages import train_stages

    grounding = _conversations(world, world / "conv" / "grounding.json", tasks=["grounding"], max_turns=1)
    small = ["max_steps=2", "batch_size=4", "save_every=2", "max_length=256", "tokenizer_vocab_size=320"]
    small += ["progress_bar=false", "tensorboard=false", "device=cpu", "precision=fp32", "log_every=1"]
    with caplog.at_level("WARNING", logger="train.mllm.build"):
        runs = train_stages(data, None, tmp_path, grounding_data=grounding, overrides=small)
    assert [run.stage for run in (runs.stage1, runs.stage2_grounding, runs.stage2)] == [1, 2, 2]
    assert runs.stage2_grounding.checkpoint == tmp_path / "stage2_grounding" / "step-000002"
    recorded = yaml.safe_load((runs.stage2.output_dir / "train_config.yaml").read_text())
    assert recorded["model_path"] == str(runs.stage2_grounding.checkpoint) and recorded["train_data"] == str(data)
    assert recorded["vision_tower"] is None and recorded["pretrain_mm_projector"] is None
    first = yaml.safe_load((runs.stage2_grounding.output_dir / "train_config.yaml").read_text())
    assert first["train_data"] == str(grounding) and first["pretrain_mm_projector"] == str(runs.stage1.mm_projector)
    assert runs.stage2.trainable_parameters["llm"] > 0 and runs.elapsed_s > 0
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]  # the inherited overrides hold


def test_model_path_runs_warn_only_about_overrides_the_model_does_not_hold():
    from transformers import LlamaConfig

    from mllm import CLOCLlavaConfig
    from train.mllm.build import differing_overrides

    text = LlamaConfig(hidden_size=64, num_hidden_layers=2).to_dict()
    config = CLOCLlavaConfig(text_config=text, vision_feature_layer=-2)
    assert differing_overrides(config, {"vision_feature_layer": -2, "text_config": {"hidden_size": 64}}) == []
    changed = {"vision_feature_layer": -1, "text_config": {"hidden_size": 64, "num_hidden_layers": 4}, "unknown": 1}
    assert differing_overrides(config, changed) == ["vision_feature_layer", "text_config.num_hidden_layers", "unknown"]


def test_tiny_tokenizer_is_trained_on_the_rendered_conversations():
    """The tiny BPE learns what the model reads: the chat template's role markers become one or two tokens (they
    were 5 and 11 when it was trained on the turn texts alone), every rendered conversation is in the corpus, and a
    conversation the template rejects is left out of it instead of failing the run."""
    from mllm.chat_template import INSTRUCTION_FIRST_CHAT_TEMPLATE
    from mllm.tiny import TINY_CORPUS
    from mllm.tokenization import train_chat_tokenizer
    from train.mllm.build import training_texts
    from train.mllm.conversations import parse_conversation

    def record(index: int, turns: int = 1) -> object:
        colour = ("red", "green", "blue")[index % 3]
        conversation = []
        for turn in range(turns):
            question = f"Where is the {colour} circle?" if turn else f"<image>\nWhere is the {colour} circle?"
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": f"[{index}, 2, 30, 40]"}]
        return parse_conversation({"id": index, "image": "a.png", "conversations": conversation})

    records = [record(i) for i in range(300)]
    texts = training_texts(records, INSTRUCTION_FIRST_CHAT_TEMPLATE)
    assert "USER: Where is the red circle?\n<image> ASSISTANT: [0, 2, 30, 40]</s>" in texts
    tokenizer = train_chat_tokenizer(texts, vocab_size=320)
    assert len(tokenizer("USER:", add_special_tokens=False)["input_ids"]) <= 2
    assert len(tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"]) <= 2

    one_turn_only = "{%- if messages | length > 2 -%}{{ raise_exception('one turn only') }}{%- endif -%}ok"
    assert training_texts([record(0), record(1, turns=2)], one_turn_only)[len(TINY_CORPUS) :] == ["ok"]
