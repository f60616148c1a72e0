"""The real-size dry run (``bench.real_size``) at tiny sizes, the 7B-shaped parameter count on the meta device, and
the dtype checks (bf16 LLM activations, fp32 geometry and loss) including that they catch a leak."""

from __future__ import annotations

import json

import pytest
import torch

from bench.real_size import (
    CLOC_PARTS,
    LLAVA_7B_SHAPE,
    SMOKE_SHAPE,
    DtypeTracer,
    build_model,
    build_processor,
    build_tokenizer,
    cloc_llava_config,
    dtype_checks,
    format_report,
    main,
    meta_parameter_counts,
    run,
    stage2_batch,
    trace_points,
)


@pytest.fixture(scope="module")
def smoke_result():
    return run(SMOKE_SHAPE, text_layers=2, new_tokens=4)


def test_smoke_run_llm_activations_are_bf16(smoke_result):
    records = {row["module"]: row for row in smoke_result["dtypes"]}
    llm = [row for row in smoke_result["dtypes"] if row["part"] == "LLM"]
    assert {"model.language_model.layers.0", "model.language_model.layers.1", "lm_head"} <= set(records)
    assert llm and all(row["output_dtype"] == "bfloat16" for row in llm)
    assert records["model.language_model"]["input_dtype"] == "bfloat16"  # inputs_embeds after the scatter
    assert records["model.region_projector"]["output_dtype"] == "bfloat16"
    assert records["loss"]["output_dtype"] == "float32"
    assert smoke_result["checks"]["llm_activations_in_model_dtype"] and smoke_result["checks"]["loss_fp32"]


def test_smoke_run_geometry_is_fp32(smoke_result):
    """DESIGN.md "At real scale": box coordinates and point encodings stay fp32 in a bf16 model."""
    encoder = next(r for r in smoke_result["dtypes"] if r["module"].endswith("prompter.point_encoder"))
    assert (encoder["input_dtype"], encoder["output_dtype"]) == ("float32", "float32")
    assert smoke_result["checks"]["geometry_fp32"]


def test_smoke_run_counts_steps_and_generates(smoke_result):
    counts = smoke_result["full_depth_parameters"]
    ours, llava = counts["cloc_llava"], counts["llava_hf"]
    assert ours["other"] == 0 and llava["other"] == 0
    assert ours["total"] - llava["total"] == ours["prompter"] + ours["region projector"]
    for part in ("ViT", "image projector", "LLM body", "LM head"):
        assert ours[part] == llava[part]
    assert smoke_result["sequence"]["regions"] == 2 and smoke_result["sequence"]["image_tokens"] == 64
    trainable = smoke_result["built"]["stage2_trainable"]
    assert trainable["llm"] > 0 and trainable["projector"] > 0 and trainable["vision"] == 0
    assert len(smoke_result["generated_ids"]) == 4 and torch.isfinite(torch.tensor(smoke_result["loss"]))
    estimates = smoke_result["deepspeed_estimates"]
    if not isinstance(estimates, str):  # deepspeed installed
        assert {(row["zero_stage"], row["gpus"]) for row in estimates} == {(2, 1), (3, 1), (2, 8), (3, 8)}
    report = format_report(smoke_result)
    assert "| LM head (logits) |" in report and "checks: " in report


def test_7b_shapes_match_llava_1_5_7b():
    """Full depth on the meta device: Llama-7B's 6,738,415,616 and CLIP ViT-L/14-336's 303,507,456 parameters."""
    tokenizer = build_tokenizer()
    config = cloc_llava_config(LLAVA_7B_SHAPE, LLAVA_7B_SHAPE.text_full_layers, tokenizer)
    assert config.image_seq_length == 576
    counts = meta_parameter_counts(config)["cloc_llava"]
    assert counts["LLM"] == 6_738_415_616
    assert counts["ViT"] == 303_507_456
    assert counts["image projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["largest_module"] == 32000 * 4096


def _tiny_traced(leak_hook):
    tokenizer = build_tokenizer()
    config = cloc_llava_config(SMOKE_SHAPE, 1, tokenizer)
    model = build_model(config, torch.bfloat16)
    handle = leak_hook(model)
    tracer = DtypeTracer(model, trace_points(model))
    batch, _ = stage2_batch(build_processor(config, tokenizer))
    with torch.no_grad(), tracer.recording():
        model(**batch)
    handle.remove()
    return dtype_checks(tracer.records(torch.bfloat16))


def test_checks_catch_an_fp32_llm_activation():
    def leak(model):
        return model.lm_head.register_forward_hook(lambda m, a, out: out.float())  # fp32 logits by accident

    checks = _tiny_traced(leak)
    assert not checks["llm_activations_in_model_dtype"] and not checks["all"]


def test_checks_catch_bf16_coordinates():
    def leak(model):
        prompter = model.model.vision_tower.prompter
        return prompter.point_encoder.register_forward_pre_hook(lambda m, args: (args[0].bfloat16(),))

    checks = _tiny_traced(leak)
    assert not checks["geometry_fp32"] and checks["llm_activations_in_model_dtype"]


def test_main_writes_json(tmp_path, capsys):
    assert main(["--shape", "smoke", "--out", str(tmp_path), "--strict"]) == 0
    written = json.loads((tmp_path / "real_size.json").read_text())
    assert written["checks"]["all"] and set(CLOC_PARTS) <= set(written["full_depth_parameters"]["cloc_llava"])
    assert "## Dtypes along the path" in capsys.readouterr().out
