"""The MLLM loss is a mean per supervised token over the whole optimizer step (transformers' ``num_items_in_batch``):
micro-batches, ranks (DDP, DeepSpeed ZeRO-2) and bf16 logits do not change it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cloc_encoder.distributed import DistributedContext
from tests.tiny_training import run_two_ranks
from tests.token_loss import loss_config, relative_difference, step_gradients, write_mixed_lengths_data
from train.loop import forward
from train.mllm.data import IGNORE_INDEX
from train.mllm.train import _build_run, _hooks

# tests.token_loss replaces the optimizer's step to read the gradients; torch's scheduler notices.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


@pytest.fixture(scope="module")
def mixed(world, tmp_path_factory):
    """The 8 mixed-length samples, a stage-1 run on them (1 process) and its hooks."""
    root = tmp_path_factory.mktemp("token_loss")
    data = write_mixed_lengths_data(world, root / "mixed.json")
    run, _, _, _ = _build_run(loss_config(data, root / "reference"), DistributedContext())
    hooks = _hooks(run)
    samples = [run.dataset[i] for i in range(8)]
    return data, run, hooks, samples


def _per_token_loss(run, batch) -> float:
    """Cross-entropy per supervised token of ``batch``, computed here from the logits (the causal shift)."""
    inputs = dict(batch.inputs)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = run.model(**inputs).logits.float()
    vocab = logits.shape[-1]
    flat = logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1)
    return float(torch.nn.functional.cross_entropy(*flat, ignore_index=IGNORE_INDEX))


def test_two_micro_batches_give_the_gradient_of_one_batch(mixed):
    _, run, hooks, samples = mixed
    short, long = hooks.collate(samples[:4]), hooks.collate(samples[4:])
    assert long.num_supervised > 5 * short.num_supervised  # box answers vs long descriptions
    whole, whole_terms = step_gradients(run, hooks, [hooks.collate(samples)])
    split, split_terms = step_gradients(run, hooks, [short, long])
    assert relative_difference(split, whole) <= 1e-6

    # The logged loss is the mean per supervised token, however the step is split.
    reference = _per_token_loss(run, hooks.collate(samples))
    for terms in (whole_terms, split_terms):
        assert hooks.log_fields(terms, 1, 1.0)["loss"] == pytest.approx(reference, rel=1e-6)
        assert terms["supervised_tokens"] == short.num_supervised + long.num_supervised

    # What the loop did before: a mean per micro-batch, micro-batches weighted equally. The box tokens then weigh
    # several times more, and the gradient is far from the full batch's.
    for batch in (short, long):
        (forward(run, batch, use_cache=False).loss / 2).backward()
    old = {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)
    assert relative_difference(old, whole) > 0.05


def test_the_loss_is_reduced_in_fp32_under_bf16(mixed):
    _, run, hooks, samples = mixed
    batch = hooks.collate(samples[:4])
    run.precision = "bf16"  # autocast: bf16 logits
    try:
        with torch.no_grad():
            assert forward(run, batch, use_cache=False).logits.dtype == torch.bfloat16
            loss, terms = hooks.terms(batch, num_items_in_batch=float(batch.num_supervised))
    finally:
        run.precision = "fp32"
    assert loss.dtype == torch.float32
    assert terms["loss_sum"] / batch.num_supervised == pytest.approx(_per_token_loss(run, batch), rel=0.05)


def test_two_gloo_ranks_under_ddp_and_zero2_give_the_gradient_of_one_process(mixed, tmp_path):
    """Rank 0 holds the 4 box answers, rank 1 the 4 long ones: DDP (one micro-batch of 4 per rank) and DeepSpeed
    ZeRO-2 (2 micro-batches of 2 per rank) both take the step of one process on all 8."""
    data, run, hooks, samples = mixed
    whole, terms = step_gradients(run, hooks, [hooks.collate(samples)])
    tokenizer = Path(run.config.output_dir) / "tokenizer"
    run_two_ranks([sys.executable, "-m", "tests.token_loss", str(data), str(tokenizer), str(tmp_path)], timeout=400)
    logged = hooks.log_fields(terms, 1, 1.0)["loss"]
    losses = json.loads((tmp_path / "losses.json").read_text())
    for name in ("ddp", "zero2"):
        grads = load_file(str(tmp_path / f"{name}.safetensors"))
        assert relative_difference(grads, whole) <= 1e-6, name
        assert losses[name] == pytest.approx(logged, rel=1e-6), name
