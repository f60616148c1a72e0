"""One invalid sample (a label mask that cannot be built, a record the processor rejects) is skipped and counted,
not the end of a run; more than ``max_invalid_fraction`` of them stops it with an error naming them."""

from __future__ import annotations

import json
import logging

import pytest

import train.mllm.data
from tests.token_loss import loss_config, write_mixed_lengths_data
from train.metrics import read_metrics
from train.mllm.data import LabelMaskingError, TooManyInvalidSamples, check_invalid_budget
from train.mllm.train import train_mllm


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    return write_mixed_lengths_data(world, tmp_path_factory.mktemp("invalid") / "mixed.json")


def _fail_for(monkeypatch, errors: dict[str, Exception]) -> None:
    """Make encoding the samples named in ``errors`` raise (forked DataLoader workers inherit the patch)."""
    encode = train.mllm.data.encode_conversation

    def patched(processor, messages, image=None, boxes=None, *, sample_id="sample", **options):
        if sample_id in errors:
            raise errors[sample_id]
        return encode(processor, messages, image, boxes, sample_id=sample_id, **options)

    monkeypatch.setattr(train.mllm.data, "encode_conversation", patched)


def test_one_invalid_sample_is_skipped_counted_and_named(data, tmp_path, monkeypatch, caplog):
    message = "sample 'mixed-5': the inference prompt of assistant turn 1 is not a token prefix"
    _fail_for(monkeypatch, {"mixed-5": LabelMaskingError(message)})
    # One epoch of the 8 samples (2 steps of 4) in a DataLoader worker: every sample is drawn once.
    config = loss_config(data, tmp_path / "run", max_steps=2, num_workers=1, log_every=1, max_invalid_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="train.mllm.run"):
        result = train_mllm(config)
    assert result.step == 2 and result.stop_reason == "max_steps"
    assert result.skipped_invalid == 1 and result.skipped_images == 0 and result.skipped_too_long == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["skipped_invalid"] == 1
    assert json.loads((result.checkpoint / "trainer_state.json").read_text())["skipped_invalid"] == 1
    assert any("mixed-5" in r.getMessage() and "not a token prefix" in r.getMessage() for r in caplog.records)


def test_too_many_invalid_samples_stop_the_run_with_their_count_and_reasons(data, tmp_path, monkeypatch):
    _fail_for(
        monkeypatch,
        {
            "mixed-1": LabelMaskingError("sample 'mixed-1': zero supervised tokens for 1 assistant turn(s)"),
            "mixed-4": ValueError("region_boxes has 2 entries for a batch of 1"),  # the processor rejects it
            "mixed-6": LabelMaskingError("sample 'mixed-6': zero supervised tokens for 1 assistant turn(s)"),
        },
    )
    config = loss_config(data, tmp_path / "run", max_steps=2, max_invalid_fraction=0.2)
    with pytest.raises(TooManyInvalidSamples, match=r"^3 training samples were invalid") as raised:
        train_mllm(config)  # 3 of 8 > 20 %
    assert "max_invalid_fraction=0.2" in str(raised.value)
    assert "mixed-1" in str(raised.value) and "sample 'mixed-4': ValueError: region_boxes" in str(raised.value)


def test_programming_errors_are_not_skipped(data, tmp_path, monkeypatch):
    _fail_for(monkeypatch, {"mixed-2": TypeError("unsupported operand type(s)")})
    with pytest.raises(TypeError, match="unsupported operand"):
        train_mllm(loss_config(data, tmp_path / "run", max_steps=2, max_invalid_fraction=1.0))


def test_the_budget_is_a_fraction_of_the_data_set_or_of_the_samples_drawn():
    check_invalid_budget(10, drawn=500, dataset_size=1000, fraction=0.01)  # 10 of 1000 allowed
    with pytest.raises(TooManyInvalidSamples, match=r"11 training samples.*First: a; b"):
        check_invalid_budget(11, drawn=500, dataset_size=1000, fraction=0.01, examples=lambda: ["a", "b"])
    check_invalid_budget(30, drawn=3000, dataset_size=1000, fraction=0.01)  # the third epoch meets them again
