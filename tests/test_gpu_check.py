"""``bench.gpu_check``: the ``--cpu-smoke`` command end to end (the same code as on a GPU, tiny sizes), and the
runner's rules: a missing package skips a part with the wheel to bring, a failing part does not stop the others.

Part (f) starts DeepSpeed, which JIT-builds ``deepspeed_shm_comm`` on first use on CPU (~40-110 s, cached under
``TORCH_EXTENSIONS_DIR``); with the cache the whole smoke run takes ~25 s.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import (
    PARTS,
    CheckContext,
    Part,
    PartResult,
    Settings,
    device_peak_tflops,
    format_markdown,
    region_test_boxes,
    run_part,
    stage2_step_flops,
    wheel_for,
)
from bench.real_size import LLAVA_7B_SHAPE, build_tokenizer, cloc_llava_config, meta_parameter_counts

REPO = Path(__file__).resolve().parents[1]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_cpu_smoke_command(tmp_path):
    out = tmp_path / "check"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    parts = {part["key"]: part for part in report["parts"]}
    assert [part["key"] for part in report["parts"]] == ["a", "b", "c", "d", "e", "f"]
    assert all(part["status"] in ("ok", "skipped") for part in parts.values()), parts
    a = parts["a"]["metrics"]
    assert parts["a"]["status"] == "ok" and a["mfu"] == "n/a" and a["tokens_per_s"] > 0
    assert a["dtype_checks"]["all"], a["dtype_failures"]
    assert parts["b"]["status"] == "skipped" and "sdpa vs eager" in parts["b"]["note"]  # no flash-attn on CPU
    assert parts["b"]["metrics"]["eager_max_abs_diff"] < 0.1
    expected_c = "ok" if _installed("bitsandbytes") and _installed("peft") else "skipped"
    assert parts["c"]["status"] == expected_c
    if expected_c == "skipped":
        assert "not installed" in parts["c"]["note"] and parts["c"]["wheels"]
    assert parts["d"]["metrics"]["ratio_batch8_ours_vs_transformers"] > 0
    e = parts["e"]["metrics"]
    assert e["thin_boxes"] > 0 and e["bf16_tower_embedding"]["cos_min"] > 0.9
    assert parts["f"]["status"] == ("ok" if _installed("deepspeed") else "skipped")
    if parts["f"]["status"] == "ok":
        f = parts["f"]["metrics"]
        assert f["numel_total"] == f["numel_per_rank"] > 0 and f["partitioned"] == f["parameters"] > 0
    markdown = (out / "gpu_check.md").read_text()
    assert "| (a) |" in markdown and "| (f) |" in markdown and "Wheels that would complete" in markdown
    assert set(report["wheels_to_complete"]) == {w for part in parts.values() for w in part["wheels"]}


@pytest.fixture(scope="module")
def smoke_context(tmp_path_factory):
    settings = Settings.cpu_smoke()
    tokenizer = build_tokenizer()
    config = cloc_llava_config(settings.shape, settings.text_layers, tokenizer)
    return CheckContext(settings, tokenizer, config, None, tmp_path_factory.mktemp("work"))


def test_a_failing_part_is_recorded_and_a_missing_package_skips(smoke_context):
    def broken(ctx):
        raise RuntimeError("boom")

    failed = run_part(Part("x", "broken", broken), smoke_context)
    assert failed.status == "failed" and failed.note == "RuntimeError: boom"
    skipped = run_part(Part("y", "needs a package", broken, ("no_such_package_here",)), smoke_context)
    assert skipped.status == "skipped" and skipped.note == "skipped: no_such_package_here not installed"
    assert skipped.wheels == ["no_such_package_here"]
    table = format_markdown(
        {
            "smoke": True,
            "environment": {"python": "3.12", "cuda": None, "packages": {"torch": torch.__version__}},
            "parts": [vars(failed), vars(skipped)],
            "wheels_to_complete": skipped.wheels,
        }
    )
    assert "| (x) | broken | failed |" in table and "RuntimeError: boom" in table


def test_wheels_and_peaks():
    assert wheel_for("bitsandbytes") == "bitsandbytes==0.50.2" and wheel_for("deepspeed") == "deepspeed==0.19.8"
    assert "flash_attn-" in wheel_for("flash_attn")
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("Some Future GPU") is None
    assert {part.key for part in PARTS} == set("abcdef")


def test_step_flops_of_the_7b_shape_follow_6nt():
    """At 4 layers the LLM term is ~6·N·T; the frozen ViT adds its forward only."""
    tokenizer = build_tokenizer()
    config = cloc_llava_config(LLAVA_7B_SHAPE, 4, tokenizer)
    counts = meta_parameter_counts(config)["cloc_llava"]
    assert counts["total"] >= 1_000_000_000  # the check's model is >= 1B parameters
    flops = stage2_step_flops(config, counts, batch=8, tokens=655, images=8)
    dense_llm = counts["LLM"] - 32000 * 4096
    assert 6 * dense_llm * 8 * 655 < flops < 1.5 * 6 * dense_llm * 8 * 655 + 2 * 8 * 3 * counts["ViT"] * 577


def test_region_test_boxes_include_thin_valid_boxes():
    boxes, thin = region_test_boxes(100, 336, torch.Generator().manual_seed(0))
    assert boxes.shape == (100, 4) and int(thin.sum()) == 50
    assert boxes.min() >= 0 and boxes.max() <= 1
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides > 0).all() and (sides[thin].min(dim=1).values <= 2 / 336 + 1e-6).all()


def test_part_result_round_trips():
    result = PartResult("a", "t", "ok", metrics={"x": 1})
    assert PartResult(**vars(result)) == result
