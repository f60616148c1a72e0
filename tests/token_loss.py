"""Shared by tests/test_mllm_token_loss.py: data with very different answer lengths, the gradient of one optimizer
step through the real MLLM hooks and loop, and (``python -m tests.token_loss DATA TOKENIZER OUT``) the same step on
2 gloo ranks under DDP and under DeepSpeed ZeRO-2.

Samples 0-3 answer with a box (a few tokens), samples 4-7 with a long description (many tokens), so a mean per
micro-batch or per rank would weigh their tokens very differently from a mean per token.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cloc_encoder.data.format import read_region_text
from cloc_encoder.distributed import DistributedContext
from train.loop import LoopHooks, distributed_session, start_run, train_step
from train.mllm.config import MLLMTrainConfig
from train.mllm.run import MLLMRun, MLLMTrainerState
from train.mllm.train import _build_run, _hooks

REPO = Path(__file__).resolve().parents[1]
LONG_ANSWER = " ".join(
    f"the {colour} shape lies {where} of the picture and is drawn with a thin dark outline"
    for colour, where in (("red", "left"), ("green", "right"), ("blue", "top"), ("yellow", "bottom"))
)
SHORT_ANSWERS = ("[12, 40, 200, 310]", "[5, 5, 99, 99]", "[300, 120, 640, 900]", "[0, 0, 999, 999]")


def write_mixed_lengths_data(world: Path, out: Path) -> Path:
    """8 conversations on the world's images: 4 box answers, then 4 long descriptions."""
    records = read_region_text(world / "train.jsonl")[:8]
    samples = []
    for index, record in enumerate(records):
        answer = SHORT_ANSWERS[index] if index < 4 else f"{LONG_ANSWER} (picture {index})"
        question = "Where is the red shape?" if index < 4 else "Describe the image in detail."
        samples.append(
            {
                "id": f"mixed-{index}",
                "image": str((world / record.image).resolve()),
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(samples), encoding="utf-8")
    return out


def loss_config(data: Path, output_dir: Path, **values: Any) -> MLLMTrainConfig:
    """Stage 1 on CPU without clipping (gradients are compared raw), no length grouping."""
    settings: dict[str, Any] = {
        "train_data": str(data),
        "output_dir": str(output_dir),
        "stage": 1,
        "batch_size": 4,
        "max_steps": 1,
        "max_length": 512,
        "grad_clip": None,
        "group_by_length": False,
        "tokenizer_vocab_size": 320,
        "progress_bar": False,
        "tensorboard": False,
        "device": "cpu",
        "save_every": 0,
    }
    settings.update(values)
    return MLLMTrainConfig(**settings)


def _capture_plain(run: MLLMRun, grads: dict[str, torch.Tensor]) -> None:
    """Replace the optimizer's step by a copy of the (DDP-averaged) gradients: the weights do not change."""
    named = [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]

    def step(*args: Any, **kwargs: Any) -> None:
        grads.update({name: p.grad.detach().clone() for name, p in named if p.grad is not None})

    run.optimizer.step = step


def _capture_deepspeed(run: MLLMRun, grads: dict[str, torch.Tensor]) -> None:
    """Copy the full reduced fp32 gradients at the accumulation boundary, before the engine's step (collective)."""
    from deepspeed.utils import safe_get_full_grad

    engine, real_step = run.engine, run.engine.step
    named = [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]

    def step(*args: Any, **kwargs: Any) -> Any:
        if engine.is_gradient_accumulation_boundary():
            grads.update({name: safe_get_full_grad(p).detach().clone().float() for name, p in named})
        return real_step(*args, **kwargs)

    engine.step = step


def step_gradients(
    run: MLLMRun, hooks: LoopHooks, micro_batches: Sequence[Any]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One optimizer step of the loop over ``micro_batches`` (the accumulation steps): the gradients the optimizer
    sees, by parameter name, and the step's terms."""
    if run.engine is None:
        run.config.gradient_accumulation_steps = len(micro_batches)
    assert run.config.gradient_accumulation_steps == len(micro_batches)
    grads: dict[str, torch.Tensor] = {}
    (_capture_deepspeed if run.engine is not None else _capture_plain)(run, grads)
    terms = train_step(run, iter(micro_batches), MLLMTrainerState(), hooks)
    return grads, terms


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all tensors together (the same names in both)."""
    assert a.keys() == b.keys() and a
    difference = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5
    return difference / norm


def _rank_step(
    config: MLLMTrainConfig, context: DistributedContext, pick: Callable[[int], list[list[int]]]
) -> tuple[dict[str, torch.Tensor], float]:
    """Build the run on this rank, take one step over the micro-batches ``pick(rank)`` (sample indices); returns the
    gradients and the logged loss."""
    run, _, _, sampler = _build_run(config, context)
    hooks = _hooks(run)
    start_run(run, MLLMTrainerState(), None, sampler, hooks)  # DDP as in training (not under DeepSpeed)
    micro_batches = [hooks.collate([run.dataset[i] for i in indices]) for indices in pick(context.rank)]
    grads, terms = step_gradients(run, hooks, micro_batches)
    loss = hooks.log_fields(terms, 1, 1.0)["loss"]
    run.metrics.close()
    return grads, loss


def main(argv: Sequence[str]) -> None:
    """Rank ``RANK`` of 2: one step under DDP (rank 0: the 4 short answers, rank 1: the 4 long ones), then under
    ZeRO-2 with 2 micro-batches of 2 per rank (the same split); rank 0 writes the gradients and logged losses to
    OUT."""
    data, tokenizer, out = (Path(arg) for arg in argv)
    zero2 = str(REPO / "train/deepspeed/zero2.json")
    with distributed_session("cpu", use_deepspeed=True) as context:
        ddp_config = loss_config(data, out / "ddp", tokenizer=str(tokenizer))
        ddp_grads, ddp_loss = _rank_step(ddp_config, context, lambda rank: [[4 * rank + i for i in range(4)]])
        zero2_config = loss_config(
            data, out / "zero2", tokenizer=str(tokenizer), batch_size=2, gradient_accumulation_steps=2, deepspeed=zero2
        )
        zero2_grads, zero2_loss = _rank_step(
            zero2_config, context, lambda rank: [[4 * rank, 4 * rank + 1], [4 * rank + 2, 4 * rank + 3]]
        )
    if os.environ.get("RANK", "0") == "0":
        save_file(ddp_grads, str(out / "ddp.safetensors"))
        save_file(zero2_grads, str(out / "zero2.safetensors"))
        (out / "losses.json").write_text(json.dumps({"ddp": ddp_loss, "zero2": zero2_loss}), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
