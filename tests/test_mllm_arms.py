"""The arms of ``bench/mllm_cloc_vs_clip.py`` (issue 12 §1): the prompter trains in stage 1 (own parameter group,
gradients) and stage 2 starts from it (carried in stage 1's projector file); ``region_feature=roi_align`` goes
through both stages from the recipe's YAMLs; the mean ± standard deviation report."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from bench.mllm_arms import ARMS, Recipe, format_report, mean_std, train_arm
from cloc_encoder.data.format import read_region_text
from cloc_encoder.image_processing import CLOCImageProcessor
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, CLOCVisionTower
from train.mllm.build import assemble_model
from train.mllm.config import MLLMTrainConfig, load_mllm_config
from train.mllm.conversations import conversations_from_records, write_conversations
from train.mllm.stages import TINY_STAGE1
from train.mllm.trainable import configure_trainable, parameter_groups, unwrap

TINY_RECIPE = [
    "batch_size=4",
    "max_length=256",
    "tokenizer_vocab_size=320",
    "device=cpu",
    "log_every=1",
    "model_overrides.text_config.num_hidden_layers=1",
    "model_overrides.text_config.hidden_size=64",
    "model_overrides.text_config.intermediate_size=128",
]
ARM = {arm.name: arm for arm in ARMS}
PROMPTER = "model.vision_tower.prompter."


@pytest.fixture(scope="module")
def conversations(world):
    path = world / "arms" / "train_conv.json"
    records = read_region_text(world / "train.jsonl")
    samples = conversations_from_records(records, out_dir=path.parent, tasks=["grounding", "referring"], max_turns=0)
    write_conversations(samples, path)
    return path


@pytest.fixture()
def tower(tiny_cloc, tmp_path):
    """A CLOC encoder folder (the 1-layer tiny encoder on 32-px images)."""
    folder = tmp_path / "tower"
    tiny_cloc.save_pretrained(folder)
    CLOCImageProcessor(image_size=32).save_pretrained(folder)
    return folder


def _prompter(tower) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in tower.prompter.state_dict().items()}


def test_stage1_trains_the_prompter_in_its_own_group(chat_tokenizer, tmp_path):
    """``tune_prompter=true`` in stage 1: the prompter (less its unused projections) requires gradients, gets the
    ``vision`` optimizer group at the stage-1 lr, and a ``<region>`` question gives it gradients."""
    overrides = ["tune_prompter=true", "vision_tower=null", f"output_dir={tmp_path}", "train_data=x"]
    config = load_mllm_config(TINY_STAGE1, overrides)
    assert config.stage == 1
    model = assemble_model(config, chat_tokenizer)
    counts = configure_trainable(model, config)
    assert counts["vision"] > 0 and counts["llm"] == 0
    prompter = model.model.vision_tower.prompter
    trainable = {n for n, p in prompter.named_parameters() if p.requires_grad}
    assert "corner_embeddings" in trainable and any(n.startswith("layer.") for n in trainable)
    assert not any(n.startswith(("projection.", "text_projection.")) for n in trainable)
    groups, _ = parameter_groups(model, config)
    vision = [g for g in groups if g["name"] == "vision"]
    assert vision and all(g["lr"] == config.peak_lr() == 1e-3 for g in vision)
    grouped = {id(p) for g in vision for p in g["params"]}
    assert all(id(p) in grouped for p in prompter.parameters() if p.requires_grad)

    processor = CLOCLlavaProcessor.from_model_config(model.config, chat_tokenizer)
    question = f"What is {processor.format_region([0.1, 0.2, 0.6, 0.7])}?"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=[text + " A red circle.</s>"])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert prompter.layer.q_proj.weight.grad.abs().sum() > 0
    assert prompter.corner_embeddings.grad.abs().sum() > 0


def test_tune_prompter_with_roi_align_is_refused(chat_tokenizer, tmp_path):
    """The RoI arm does not use the prompter: asking to train it is an error, not a silent no-op."""
    overrides = ["tune_prompter=true", "vision_tower=null", f"output_dir={tmp_path}", "train_data=x"]
    config = load_mllm_config(TINY_STAGE1, [*overrides, "model_overrides.region_feature=roi_align"])
    model = assemble_model(config, chat_tokenizer)
    with pytest.raises(ValueError, match="region_feature is 'roi_align'"):
        configure_trainable(model, config)


def _recipe() -> Recipe:
    return Recipe(stage1_steps=2, stage2_steps=2, overrides=list(TINY_RECIPE))


def test_trained_prompter_arm_carries_the_stage1_prompter_into_stage2(conversations, tower, tmp_path, caplog):
    """Stage 2 starts from the prompter as stage 1 left it, through the pipeline: the same tower folder (no warning
    about another base) plus the prompter stage 1's projector file carries; it trains the prompter further."""
    caplog.set_level(logging.INFO, logger="train.mllm.projector")
    stage1, stage2 = train_arm(ARM["CLIP + trained prompter"], _recipe(), conversations, tower, tmp_path / "arm", 0)
    assert stage1.trainable_parameters["vision"] > 0 and stage2.trainable_parameters["vision"] > 0
    start = _prompter(CLOCVisionTower.from_cloc(tower))
    after1 = _prompter(unwrap(stage1.model).model.vision_tower)
    carried = {k[len(PROMPTER) :]: v for k, v in load_file(str(stage1.mm_projector)).items() if k.startswith(PROMPTER)}
    assert "corner_embeddings" in carried and all(torch.equal(v, after1[k]) for k, v in carried.items())
    assert not torch.equal(after1["corner_embeddings"], start["corner_embeddings"])
    settings = yaml.safe_load((stage2.checkpoint / "train_config.yaml").read_text())
    assert settings["vision_tower"] == str(tower) and settings["tune_prompter"] is True
    assert not [r for r in caplog.records if "another base" in r.message]
    assert [r for r in caplog.records if "vision-tower tensors (parts: prompter)" in r.message]
    after2 = _prompter(unwrap(stage2.model).model.vision_tower)
    assert not torch.equal(after2["corner_embeddings"], after1["corner_embeddings"])


def test_roi_align_arm_through_both_stages(conversations, tower, tmp_path, caplog):
    """``model_overrides.region_feature=roi_align`` reaches the model in both stages (the recipe's text_config kept);
    stage 2 loads the stage-1 projector (same width, same base: no warning); no tower part is carried."""
    caplog.set_level(logging.WARNING, logger="train.mllm.projector")
    stage1, stage2 = train_arm(ARM["CLIP + RoI features"], _recipe(), conversations, tower, tmp_path / "arm", 0)
    for result in (stage1, stage2):
        config = unwrap(result.model).config
        assert config.region_feature == "roi_align" and config.text_config.num_hidden_layers == 1
        assert unwrap(result.model).model.region_projector.linear_1.in_features == config.vision_config.vision_width
        assert result.trainable_parameters["vision"] == 0
    assert not any(k.startswith(PROMPTER) for k in load_file(str(stage1.mm_projector)))
    assert not [r for r in caplog.records if "another base" in r.message or "starts fresh" in r.message]


def test_trained_prompter_arm_through_both_phases_of_stage2(world, conversations, tower, tmp_path):
    """With grounding conversations stage 2 runs in two phases: the grounding phase starts from the tower and stage
    1's projector file and trains the prompter further; the mixed phase starts from that phase's whole model
    (``model_path``, no tower folder) and trains the prompter again."""
    grounding = world / "arms" / "grounding_conv.json"
    records = read_region_text(world / "train.jsonl")
    write_conversations(conversations_from_records(records, out_dir=grounding.parent, tasks=["grounding"]), grounding)
    recipe = Recipe(stage1_steps=2, grounding_steps=2, stage2_steps=2, overrides=list(TINY_RECIPE))
    arm = ARM["CLIP + trained prompter"]
    stage1, stage2 = train_arm(arm, recipe, conversations, tower, tmp_path / "arm", 0, grounding)
    first = tmp_path / "arm" / "stage2_grounding" / "step-000002"
    settings = yaml.safe_load((first / "train_config.yaml").read_text())
    assert settings["train_data"] == str(grounding) and settings["vision_tower"] == str(tower)
    assert settings["pretrain_mm_projector"] == str(stage1.mm_projector) and settings["tune_prompter"] is True
    settings = yaml.safe_load((stage2.checkpoint / "train_config.yaml").read_text())
    assert settings["model_path"] == str(first) and settings["vision_tower"] is None
    assert settings["train_data"] == str(conversations) and stage2.trainable_parameters["vision"] > 0
    after_first = _prompter(CLOCLlavaForConditionalGeneration.from_pretrained(first).model.vision_tower)
    after1 = _prompter(unwrap(stage1.model).model.vision_tower)
    after2 = _prompter(unwrap(stage2.model).model.vision_tower)
    assert not torch.equal(after_first["corner_embeddings"], after1["corner_embeddings"])
    assert not torch.equal(after2["corner_embeddings"], after_first["corner_embeddings"])


def test_recipe_order_puts_arm_and_paths_last():
    recipe = Recipe(stage1_steps=5, overrides=["lr=1"], stage1_overrides=["lr=2"])
    overrides = recipe.stage(1, 7, ARM["CLIP + trained prompter"], ["output_dir=x"])
    assert overrides[-3:] == ["lr=2", "tune_prompter=true", "output_dir=x"]
    assert {"init_seed=7", "seed=7", "max_steps=5"} <= set(overrides)
    assert not any(o.startswith("max_steps") for o in recipe.stage(2, 7, ARM["CLOC"], []))
    phases = Recipe(grounding_steps=3, stage2_steps=4, stage2_overrides=["lr=5"])
    assert {"max_steps=3", "lr=5"} <= set(phases.stage(2, 7, ARM["CLOC"], [], grounding=True))
    assert {"max_steps=4", "lr=5"} <= set(phases.stage(2, 7, ARM["CLOC"], []))
    config = load_mllm_config(TINY_STAGE1, recipe.stage(1, 7, ARM["CLIP + RoI features"], ["train_data=x"]))
    assert isinstance(config, MLLMTrainConfig) and config.model_overrides["region_feature"] == "roi_align"
    assert config.model_overrides["text_config"]["hidden_size"] == 256  # the YAML's text_config is kept


def test_mean_std_and_report():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([0.5, None]) == {"mean": 0.5, "std": None, "n": 1}
    rows = [
        {"arm": "A", "seed": s, "grounding_acc@0.5": v, "referring_acc": 0.5, "minutes": 1.0}
        for s, v in enumerate((0.1, 0.3))
    ]
    towers = [{"tower": "T", "seed": 0, "region_cls_acc": 0.9, "minutes": 2.0}]
    report = format_report(rows, towers)
    assert "| A | 2 | 20.0 ± 14.1% |" in report
    assert "| T | 1 | 90.0% |" in report and "| A | 1 | 30.0% |" in report
    rows += [{"arm": "B", "seed": s, "grounding_acc@0.5": v, "referring_acc": 0.4} for s, v in enumerate((0.2, 0.3))]
    report = format_report(rows, towers)
    assert "Paired differences against A" in report
    assert "| B | 2 | 5.0 ± 7.1 pt | n/a | -10.0 ± 0.0 pt |" in report  # (0.1, 0.0) and (-0.1, -0.1) in points


def _results(folder, seeds, lr="3e-4"):
    rows = [{"arm": "A", "seed": s, "grounding_acc@0.5": 0.1 * (s + 1)} for s in seeds]
    towers = [{"tower": "T", "seed": s, "region_cls_acc": 0.9} for s in seeds]
    folder.mkdir()
    result = {"settings": {"seeds": seeds, "recipe": {"lr": lr}}, "arms": {"A": {}}, "towers": {"T": []}}
    result.update(rows=rows, tower_rows=towers)
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def test_merge_joins_seed_runs_and_refuses_mismatches(tmp_path):
    from bench.mllm_cloc_vs_clip import main

    a, b = _results(tmp_path / "a", [0]), _results(tmp_path / "b", [1, 2])
    assert main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["settings"]["seeds"] == [0, 1, 2] and len(merged["rows"]) == 3
    assert merged["summary"]["A"]["grounding_acc@0.5"]["n"] == 3
    assert abs(merged["summary"]["A"]["grounding_acc@0.5"]["mean"] - 0.2) < 1e-12
    assert "| A | 3 |" in (tmp_path / "m" / "results.md").read_text()
    other = _results(tmp_path / "c", [3], lr="1e-3")
    with pytest.raises(SystemExit, match=r"c/results\.json: its settings differ"):
        main(["--merge", str(a), str(other), "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit, match="repeats seed"):
        main(["--merge", str(a), str(a), "--out", str(tmp_path / "m3")])
