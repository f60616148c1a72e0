"""One rank of :mod:`tests.test_mllm_zero3` (``python -m tests.zero3_worker SPEC.json``, launched twice by
:func:`tests.tiny_training.run_two_ranks`). Writes ``report_rank<r>.json`` into the spec's ``out`` folder.

1. Sharded build: a CLOC-LLaVA whose LLM is a wide Llama built from config (``model_overrides``) under ZeRO-3 —
   elements held per rank, the full count, this process's peak RSS during the build; then the same model built
   without DeepSpeed, for the peak it needs.
2. The same base from a CLOC encoder folder and a causal-LM folder (vocabulary resized for ``<image>``/``<region>``,
   fresh projectors from ``init_seed``) built under ZeRO-3 and without it: the gathered weights must agree.
3. Stage 1 then stage 2 (full fine-tuning) under ZeRO-3 from those folders, and the trained model's logits on
   :func:`probe_inputs` (rank 0 writes them), to compare with the saved ``model.safetensors`` in a fresh process;
   that checkpoint loaded again as a ``model_path`` under ZeRO-3 (partitioned, the saved values).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ZERO3_JSON = Path(__file__).resolve().parents[1] / "train" / "deepspeed" / "zero3.json"


def probe_inputs(processor: Any) -> dict[str, Any]:
    """A fixed image + region question (the same tensors in every process)."""
    question = "What is [100, 200, 600, 700] <region>?"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=[Image.new("RGB", (40, 32), (200, 40, 40))], text=[prompt])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measured(build: Any) -> tuple[Any, dict[str, float]]:
    """``build()`` and this process's RSS before it and peak RSS during it (MiB)."""
    gc.collect()
    before = _status_kib("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    value = build()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value, {"rss_before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": seconds, "reset": reset}


def _config(spec: dict[str, Any], output_dir: str, **values: Any) -> Any:
    from train.mllm.config import MLLMTrainConfig

    settings = {
        "train_data": spec["data"],
        "output_dir": output_dir,
        "batch_size": 2,
        "max_steps": 2,
        "log_every": 1,
        "save_every": 0,
        "max_length": 256,
        "progress_bar": False,
        "tensorboard": False,
        "device": "cpu",
        "deepspeed": str(ZERO3_JSON),
    }
    settings.update(values)
    return MLLMTrainConfig(**settings)


def _ds_config(config: Any, tokenizer: Any) -> dict[str, Any]:
    from train.mllm.build import planned_text_config
    from train.runtime import deepspeed_config

    hidden = planned_text_config(config, tokenizer).hidden_size
    auto = {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }
    return deepspeed_config(config.deepspeed, config, world_size=2, auto_values=auto)


def sharded_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 1 (see the module docstring)."""
    from mllm.tiny import TINY_CORPUS
    from mllm.tokenization import train_chat_tokenizer
    from train.mllm.build import assemble_model
    from train.mllm.zero3 import partition_report

    tokenizer = train_chat_tokenizer(TINY_CORPUS, vocab_size=320)
    config = _config(spec, spec["out"] + "/unused", model_overrides={"text_config": spec["big_text_config"]})
    ds_config = _ds_config(config, tokenizer)
    model, sharded = _measured(lambda: assemble_model(config, tokenizer, torch.float32, ds_config))
    sharded.update(partition_report(model))
    del model
    model, plain = _measured(lambda: assemble_model(config, tokenizer, torch.float32))
    plain.update(partition_report(model))
    del model
    gc.collect()
    return {"sharded": sharded, "plain": plain}


def same_base(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 2: the largest absolute difference between the ZeRO-3 build (gathered) and the plain one (rank 0)."""
    from transformers import AutoTokenizer

    from train.mllm.build import assemble_model
    from train.mllm.zero3 import gathered_state_dict, partition_report

    rank = torch.distributed.get_rank()
    config = _config(spec, spec["out"] + "/unused", vision_tower=spec["tower"], language_model=spec["llm"])
    tokenizer = AutoTokenizer.from_pretrained(spec["llm"])
    from mllm.tokenization import add_mllm_tokens

    add_mllm_tokens(tokenizer)
    model = assemble_model(config, tokenizer, torch.float32, _ds_config(config, tokenizer))
    report = partition_report(model)
    sharded = gathered_state_dict(model, keep=rank == 0)
    if rank == 0:
        plain = assemble_model(config, tokenizer).state_dict()
        report["keys_equal"] = sorted(plain) == sorted(sharded)
        report["max_abs_diff"] = max(float((plain[k] - sharded[k]).abs().max()) for k in plain)
    return report


def train_and_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 3: stage 1 and stage 2 under ZeRO-3; rank 0 writes the trained model's logits on the probe."""
    from train.mllm.build import assemble_model
    from train.mllm.train import train_mllm
    from train.mllm.trainable import unwrap
    from train.mllm.zero3 import gathered_state_dict, partition_report

    folders = {"vision_tower": spec["tower"], "language_model": spec["llm"]}
    first = train_mllm(_config(spec, spec["out"] + "/stage1", stage=1, lr=1e-2, **folders))
    second = train_mllm(
        _config(spec, spec["out"] + "/stage2", stage=2, pretrain_mm_projector=str(first.mm_projector), **folders)
    )
    model = unwrap(second.model).eval()
    with torch.no_grad():  # collective: ZeRO-3 gathers each layer's weights on every rank as it runs
        logits = model(**probe_inputs(second.processor)).logits
    rank = torch.distributed.get_rank()
    if rank == 0:
        save_file({"logits": logits.float().contiguous()}, str(Path(spec["out"]) / "logits.safetensors"))
    report = {
        "stage1_losses": [r["loss"] for r in first.log_history if "loss" in r],
        "stage2_losses": [r["loss"] for r in second.log_history if "loss" in r],
        "stage2_checkpoint": str(second.checkpoint),
        "stage2_trainable": second.trainable_parameters,
        "stage2_partition": partition_report(model),
    }
    # the saved model as a model_path (e.g. a converted llava-hf checkpoint) loads partitioned, with its values
    config = _config(spec, spec["out"] + "/unused", model_path=str(second.checkpoint))
    again = assemble_model(
        config, second.processor.tokenizer, torch.float32, _ds_config(config, second.processor.tokenizer)
    )
    report["model_path_partition"] = partition_report(again)
    state = gathered_state_dict(again, keep=rank == 0)
    if rank == 0:
        saved = load_file(str(second.checkpoint / "model.safetensors"))
        report["model_path_max_abs_diff"] = max(float((saved[k] - state[k]).abs().max()) for k in saved)
    return report


def main(spec_path: str) -> None:
    import deepspeed

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    deepspeed.init_distributed(dist_backend="gloo")  # kept for the whole process: train_mllm leaves it open
    rank = torch.distributed.get_rank()
    report: dict[str, Any] = {"rank": rank, "seconds": {}}
    for name, part in (("build", sharded_build), ("same_base", same_base), ("training", train_and_probe)):
        start = time.perf_counter()
        report[name] = part(spec)
        report["seconds"][name] = time.perf_counter() - start
    Path(spec["out"], f"report_rank{rank}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
