"""CLOC pretraining: config parsing, data pipeline, atomic checkpoints, exact resume, metrics."""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cloc_encoder import CLOCModel
from cloc_encoder.data.format import Region, RegionTextRecord, read_region_text
from cloc_encoder.image_processing import CLOCImageProcessor
from tests.tiny_training import TINY_CLOC_OVERRIDES as TINY_MODEL
from train.checkpoint import CheckpointManager, capture_rng_state, load_state, save_state, write_json
from train.cloc.build import check_model_overrides
from train.cloc.config import CLOCTrainConfig, load_config
from train.cloc.data import (
    MODEL_INPUT_KEYS,
    RegionTextDataset,
    collate_cloc,
)
from train.cloc.pretrain import main, train_cloc
from train.config import ConfigError
from train.metrics import read_metrics
from train.runtime import deepspeed_config
from train.samplers import EvalBatchSampler, ResumableBatchSampler
from train.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]


def tiny_config(world: Path, output_dir: Path, **values) -> CLOCTrainConfig:
    defaults = {
        "train_data": str(world / "train.jsonl"),
        "output_dir": str(output_dir),
        "model_overrides": json.loads(json.dumps(TINY_MODEL)),
        "tokenizer_vocab_size": 128,
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "log_every": 1,
        "save_every": 3,
        "progress_bar": False,
        "device": "cpu",
    }
    defaults.update(values)
    return CLOCTrainConfig(**defaults)


def tiny_tokenizer(world: Path):
    from cloc_encoder.tokenization import train_caption_tokenizer
    from train.cloc.build import training_texts

    return train_caption_tokenizer(training_texts(read_region_text(world / "train.jsonl")), 128, 16)


# ----- config ------------------------------------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "train_data: data/train.jsonl\nlr: 1e-3\nbetas: [0.9, 0.95]\nmodel_overrides: {prompter_pool: all}\n"
    )
    config = load_config(
        path,
        [
            "batch_size=8",
            "weight_decay=0.05",
            "max_minutes=none",
            "tensorboard=false",
            "model_overrides.grounding_weight=5e-1",
            "model_overrides.vision_config.image_size=32",
            "betas=0.8,0.9",
        ],
    )
    assert config.lr == 1e-3 and isinstance(config.lr, float)  # YAML 1.1 reads "1e-3" as a string
    assert config.batch_size == 8 and config.weight_decay == 0.05 and config.max_minutes is None
    assert config.tensorboard is False and config.betas == (0.8, 0.9)
    assert config.model_overrides == {
        "prompter_pool": "all",
        "grounding_weight": 0.5,
        "vision_config": {"image_size": 32},
    }
    shipped = load_config(REPO / "train/configs/cloc_tiny.yaml").validate()
    assert shipped.preset == "tiny" and shipped.lr == 1e-3 and shipped.betas == (0.9, 0.98)
    assert shipped.train_data.endswith("train.jsonl")


def test_config_base_is_loaded_first_and_mappings_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 1e-3\nbatch_size: 8\nmodel_overrides: {prompter_pool: all, a: 1}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text("base: ../base.yaml\nlr: 2e-4\nmodel_overrides: {a: 2}\n")
    config = load_config(tmp_path / "sub" / "run.yaml", ["batch_size=4"])
    assert config.lr == 2e-4 and config.batch_size == 4
    assert config.model_overrides == {"prompter_pool": "all", "a": 2}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml: config file .*missing.yaml not found"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "typo.yaml").write_text("base: base.yaml\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'batch_sise'"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("lrr: 0.1\n", [], "unknown config key 'lrr' (did you mean 'lr'?)"),
        ("", ["bach_size=3"], "unknown config key 'bach_size'"),
        ("", ["batch_size=abc"], "config key 'batch_size'"),
        ("", ["batch_size=2.5"], "config key 'batch_size'"),
        ("", ["lr.x=1"], "'lr' is not a mapping"),
        ("", ["precision=fp16"], "config key 'precision'"),
        ("", ["lr"], "not of the form key=value"),
        ("- a\n", [], "expected a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert message in str(error.value)
    if yaml_text.startswith("lrr"):
        assert str(path) in str(error.value)


def test_config_validation_and_model_override_keys():
    with pytest.raises(ConfigError, match="'train_data' is required"):
        CLOCTrainConfig().validate()
    with pytest.raises(ConfigError, match="'batch_size' must be >= 1"):
        CLOCTrainConfig(train_data="x", batch_size=0).validate()
    from cloc_encoder.factory import preset_config

    reference = preset_config("tiny")
    check_model_overrides({"prompter_pool": "all", "vision_config": {"image_size": 32}}, reference)
    with pytest.raises(ConfigError, match=r"model_overrides\.prompter_poool"):
        check_model_overrides({"prompter_poool": "all"}, reference)
    with pytest.raises(ConfigError, match=r"model_overrides\.vision_config\.image_sise"):
        check_model_overrides({"vision_config": {"image_sise": 32}}, reference)


def test_attention_implementation_is_the_configs_and_gives_the_same_features(world, tmp_path):
    from train.cloc.build import build_model

    tokenizer = tiny_tokenizer(world)
    pixels = torch.randn(2, 3, TINY_MODEL["vision_config"]["image_size"], TINY_MODEL["vision_config"]["image_size"])
    features = {}
    for attn in ("sdpa", "eager"):
        config = tiny_config(world, tmp_path / attn, attn_implementation=attn).validate()
        model = build_model(config, tokenizer).eval()
        assert model.config.vision_config._attn_implementation == attn
        assert model.config.text_config._attn_implementation == attn
        with torch.no_grad():
            features[attn] = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(features["eager"], features["sdpa"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="'attn_implementation' must be one of"):
        tiny_config(world, tmp_path, attn_implementation="flash").validate()


def test_deepspeed_config_is_filled_from_train_config(tmp_path):
    config = CLOCTrainConfig(train_data="x", batch_size=4, gradient_accumulation_steps=2, grad_clip=None)
    config.precision = "bf16"
    filled = deepspeed_config(REPO / "train/deepspeed/zero2.json", config, world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 16 and filled["gradient_clipping"] == 0.0
    assert filled["bf16"]["enabled"] is True and filled["zero_optimization"]["stage"] == 2
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        deepspeed_config(bad, config, 1)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size"):
        deepspeed_config(bad, config, 1)


def test_lr_schedule_warmup_then_cosine():
    factor = lr_factor(warmup_steps=4, max_steps=12, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(12) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


# ----- data --------------------------------------------------------------------------------------------------------


def test_collate_gives_forward_kwargs_with_processed_boxes(world, tmp_path):
    # A 48x32 image: pad mode resizes it to 32x21 and pastes it at rows 5..26 of the 32x32 model input.
    Image.new("RGB", (48, 32), (255, 0, 0)).save(tmp_path / "wide.png")
    record = RegionTextRecord(
        id="wide",
        image="wide.png",
        width=48,
        height=32,
        caption="a red picture",
        regions=[Region(box=[0.0, 0.0, 1.0, 1.0], caption="everything"), Region(box=[0.5, 0.5, 1.0, 1.0])],
        root=tmp_path,
    )
    processor = CLOCImageProcessor(image_size=32)
    dataset = RegionTextDataset([record], processor, tiny_tokenizer(world), max_regions=4, max_length=16)
    sample = dataset[(0, 0)]
    assert sample["region_texts"] == ["everything"]  # the region without text is left out
    expected = processor.frame_transform(48, 32).boxes_to_model([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(sample["region_boxes"], expected)
    assert sample["region_boxes"][0].tolist() == pytest.approx([0.0, 5 / 32, 1.0, 26 / 32], abs=1e-3)

    records = read_region_text(world / "train.jsonl")
    dataset = RegionTextDataset(records, processor, tiny_tokenizer(world), max_regions=2, max_length=16, seed=3)
    batch = collate_cloc([dataset[(0, i)] for i in range(4)])
    forward_args = set(inspect.signature(CLOCModel.forward).parameters) - {"self", "return_loss"}
    assert set(batch.inputs) == forward_args == set(MODEL_INPUT_KEYS)
    regions = int(batch.inputs["region_boxes"].shape[0])
    assert batch.inputs["pixel_values"].shape == (4, 3, 32, 32)
    assert batch.inputs["input_ids"].shape == batch.inputs["attention_mask"].shape == (4, 16)
    assert batch.inputs["region_input_ids"].shape == (regions, 16) and 4 <= regions <= 8
    assert batch.inputs["region_image_index"].tolist() == sorted(batch.inputs["region_image_index"].tolist())
    first = records[0]
    sample = dataset[(0, 0)]
    boxes = processor.frame_transform(first.width, first.height).boxes_to_model([r.box for r in first.regions])
    assert all(any(torch.allclose(box, ref) for ref in boxes) for box in sample["region_boxes"])
    # Deterministic in (seed, epoch, index); all of a region's texts are used over epochs.
    again = dataset[(0, 0)]
    assert again["region_texts"] == sample["region_texts"]
    assert torch.equal(again["region_boxes"], sample["region_boxes"])
    seen = {text for epoch in range(40) for text in dataset[(epoch, 0)]["region_texts"]}
    texts = {t for region in first.regions for t in [region.caption, *region.expressions] if t}
    assert seen == texts
    from cloc_encoder.factory import build_cloc_model

    model = build_cloc_model("tiny", dataset.tokenizer, **json.loads(json.dumps(TINY_MODEL)))
    with torch.no_grad():
        output = model(**batch.inputs)
    assert math.isfinite(float(output.loss)) and output.region_embeds.shape[0] == regions


def test_sampler_resumes_and_shards(world):
    sampler = ResumableBatchSampler(32, 4, seed=7)
    stream = iter(sampler)
    first = [next(stream) for _ in range(20)]  # 8 batches per epoch: crosses two epoch boundaries
    resumed = iter(ResumableBatchSampler(32, 4, seed=7, start=11))
    assert [next(resumed) for _ in range(9)] == first[11:]
    assert {i for batch in first[:8] for _, i in batch} == set(range(32))
    assert first[8][0][0] == 1 and [i for _, i in first[0]] != [i for _, i in first[8]]
    ranks = [ResumableBatchSampler(32, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 4
    global_batch = first[0] + first[1]
    assert ranks[0].batch(0, 0) + ranks[1].batch(0, 0) == global_batch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(7, 4, world_size=2)
    assert len(EvalBatchSampler(10, 4)) == 3 and len(EvalBatchSampler(10, 4, world_size=2)) == 1


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    records = read_region_text(data / "train.jsonl")
    (data / records[5].image).write_bytes(b"not a png")
    (data / records[9].image).unlink()
    processor = CLOCImageProcessor(image_size=32)
    dataset = RegionTextDataset(records, processor, tiny_tokenizer(world), max_regions=4, max_length=16)
    sample = dataset[(0, 5)]
    assert sample["id"] == records[6].id and len(sample["skipped"]) == 1 and records[5].id in sample["skipped"][0]
    assert records[9].id in dataset[(0, 9)]["skipped"][0]
    # One epoch (4 steps of 8) visits each bad image once.
    config = tiny_config(data, tmp_path / "out", max_steps=4, save_every=0, tensorboard=False)
    result = train_cloc(config)
    assert result.skipped_images == 2 and math.isfinite(result.metrics["loss"])
    assert json.loads((result.checkpoint / "trainer_state.json").read_text())["skipped_images"] == 2


# ----- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_manager_is_atomic_and_prunes(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        folder = manager.begin(step)
        write_json(folder / "trainer_state.json", {"step": step})
        manager.commit(step)
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    assert [s for s, _ in manager.checkpoints()] == [2, 3]
    manager.begin(4)  # a crash mid-save leaves a .tmp folder: ignored
    assert manager.latest() == tmp_path / "step-000003"
    with pytest.raises(RuntimeError, match="incomplete checkpoint"):
        manager.commit(4)
    (tmp_path / "latest").write_text("step-000009\n")  # broken pointer: fall back to the newest complete one
    assert manager.latest() == tmp_path / "step-000003"
    manager.remove_stale_tmp()
    assert not (tmp_path / "step-000004.tmp").exists()


def test_state_files_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_state(tmp_path, "optimizer", optimizer.state_dict())
    save_state(tmp_path, "rng", capture_rng_state())
    restored = load_state(tmp_path, "optimizer")
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key, state in original["state"].items():
        assert all(torch.equal(state[name], restored["state"][key][name]) for name in state)
    assert torch.equal(load_state(tmp_path, "rng")["torch"], torch.get_rng_state())
    with pytest.raises(TypeError, match="without pickle"):
        save_state(tmp_path, "bad", {"x": object()})


def test_exact_resume_metrics_and_tensorboard(world, tmp_path):
    straight = train_cloc(tiny_config(world, tmp_path / "straight", val_data=str(world / "val.jsonl")))
    assert straight.step == 6 and straight.checkpoint == tmp_path / "straight" / "step-000006"
    metrics = read_metrics(tmp_path / "straight")
    train_records = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    for key in ("loss", "loss_clip", "loss_region", "loss_grounding", "region_weight", "lr", "logit_scale"):
        assert all(math.isfinite(r[key]) for r in train_records), key
    assert "val_loss" in metrics[-1] and straight.val_metrics["val_loss"] == metrics[-1]["val_loss"]
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))

    class Killed(Exception):
        pass

    def kill_at_step_4(state):
        if state.step == 4:  # after the step-3 checkpoint and the step-4 log line
            raise Killed

    resumed_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_cloc(tiny_config(world, resumed_dir, val_data=str(world / "val.jsonl")), step_callback=kill_at_step_4)
    assert (resumed_dir / "latest").read_text().strip() == "step-000003"
    (resumed_dir / "step-000006.tmp").mkdir()  # a half-written checkpoint of a crashed save
    (resumed_dir / "step-000006.tmp" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_cloc(tiny_config(world, resumed_dir))
    assert main(["--config", str(_write_config(world, resumed_dir)), "--resume"]) == 0

    resumed = [r for r in read_metrics(resumed_dir) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 7))  # the killed run's step-4 line was dropped
    for a, b in zip(train_records, resumed, strict=True):
        for key in ("loss", "loss_clip", "loss_region", "loss_grounding", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    final_a = load_file(str(tmp_path / "straight" / "step-000006" / "model.safetensors"))
    final_b = load_file(str(resumed_dir / "step-000006" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)
    model = CLOCModel.from_pretrained(resumed_dir / "step-000006")  # self-contained checkpoint
    assert model.config.max_regions_per_image == 4 and (resumed_dir / "step-000006" / "tokenizer.json").exists()


def _write_config(world: Path, output_dir: Path) -> Path:
    config = tiny_config(world, output_dir, val_data=str(world / "val.jsonl"))
    path = output_dir.parent / "resume.yaml"
    config.save_yaml(path)
    return path


def test_command_line_names_a_data_file_without_usable_records(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a"}\nnot json\n')
    argv = [
        "--config",
        str(REPO / "train/configs/cloc_tiny.yaml"),
        f"train_data={data}",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"train_data {data}: no usable region-text record" in err
    assert "2 malformed skipped; first: " in err and f"{data}:1:" in err


def test_max_minutes_stops_with_a_checkpoint(world, tmp_path):
    config = tiny_config(world, tmp_path / "timed", max_steps=1000, max_minutes=1e-4, log_every=10, tensorboard=False)
    result = train_cloc(config)
    assert result.stop_reason == "max_minutes" and result.step == 1
    assert result.checkpoint == tmp_path / "timed" / "step-000001" and result.metrics["step"] == 1
    assert result.metrics["lr"] == pytest.approx(config.lr * lr_factor(2, 1000, 0.0)(0))


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(world, tmp_path):
    """A scheduler's preemption (SIGTERM) ends the run cleanly at the current step; --resume then finishes it with
    the same weights as a run that was never interrupted."""
    straight = train_cloc(tiny_config(world, tmp_path / "straight", tensorboard=False))

    def terminate_at_step_2(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    stopped = train_cloc(tiny_config(world, tmp_path / "run", tensorboard=False), step_callback=terminate_at_step_2)
    assert signal.getsignal(signal.SIGTERM) == previous  # the loop's handler is removed again
    assert stopped.stop_reason == "SIGTERM" and stopped.step == 2
    assert stopped.checkpoint == tmp_path / "run" / "step-000002"  # not a save_every step: written for the signal
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000002"
    resumed = train_cloc(tiny_config(world, tmp_path / "run", tensorboard=False, resume=True))
    assert resumed.step == 6 and resumed.stop_reason == "max_steps"
    final_a = load_file(str(straight.checkpoint / "model.safetensors"))
    final_b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert all(torch.allclose(final_a[k], final_b[k], atol=1e-6) for k in final_a)
