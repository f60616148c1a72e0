"""llava-hf → CLOC-LLaVA conversion: a tiny random transformers ``LlavaForConditionalGeneration`` saved to disk,
converted, and compared with transformers' own model (logits within 1e-5 in fp32 on CPU, same greedy tokens);
key accounting errors; the ``--cloc`` vision-tower swap."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

import mllm
from cloc_encoder import CLOCModel
from cloc_encoder.factory import build_cloc_model
from mllm.convert_llava_hf import REPORT_NAME, ConversionError, convert_llava_hf, main
from mllm.tiny_llava_hf import IMAGE_SIZE, PATCH, save_tiny_llava_hf

IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH) ** 2


def _image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-hf")
    save_tiny_llava_hf(path)
    return path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "cloc-llava"
    report = convert_llava_hf(source, out)
    return out, report


@pytest.fixture(scope="module")
def llava_pair(source, converted):
    """(transformers' LlavaForConditionalGeneration, the converted model via the Auto classes), fp32 eval."""
    reference = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    model = AutoModelForImageTextToText.from_pretrained(converted[0], dtype=torch.float32).eval()
    return reference, model


@pytest.fixture(scope="module")
def batch(source):
    """Two left-padded prompts with one image each, from llava-hf's own processor."""
    processor = AutoProcessor.from_pretrained(source)
    texts = [
        processor.apply_chat_template(_prompt(q), add_generation_prompt=True)
        for q in ("Where is the small red circle?", "What is it?")
    ]
    images = [_image(64, 48, 0), _image(40, 56, 1)]
    return processor(images=images, text=texts, padding=True, return_tensors="pt"), texts, images


def test_converted_logits_equal_llava_hf(llava_pair, batch):
    reference, model = llava_pair
    assert isinstance(model, mllm.CLOCLlavaForConditionalGeneration)
    inputs = batch[0]
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 2 * IMAGE_SEQ_LENGTH
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
        ).logits
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_generation_matches_llava_hf(llava_pair, batch):
    reference, model = llava_pair
    inputs = batch[0]
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        expected = reference.generate(**inputs, **kwargs)
        got = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            **kwargs,
        )
    new = expected[:, inputs["input_ids"].shape[1] :]
    assert new.shape == (2, 8)
    assert len(set(new.flatten().tolist())) > 1  # not a degenerate model repeating one token
    assert torch.equal(got, expected)


def test_converted_processor_matches_llava_hf(source, converted, batch):
    inputs, texts, images = batch
    processor = AutoProcessor.from_pretrained(converted[0])
    reference = AutoProcessor.from_pretrained(source)
    assert isinstance(processor, mllm.CLOCLlavaProcessor)
    assert processor.image_processor.resize_mode == "crop"
    assert processor.chat_template == reference.chat_template  # carried over ("source")
    assert processor.apply_chat_template(_prompt("What is it?"), add_generation_prompt=True) == texts[1]
    ours = processor(images=images, text=texts, padding=True)
    assert torch.equal(ours["input_ids"], inputs["input_ids"])
    assert torch.equal(ours["attention_mask"], inputs["attention_mask"])
    # Pixel values match CLIPImageProcessor's when the resize is exact (square images): equal at the model's size,
    # within one 8-bit level (1/255/std) after a 2x downscale (PIL vs torchvision bicubic). Other sizes differ by
    # the rounding of the resized size and crop offset (docs/llava_hf.md); the logit tests share pixel_values.
    for side, atol in ((IMAGE_SIZE, 1e-6), (2 * IMAGE_SIZE, 1 / 255 / min(reference.image_processor.image_std))):
        square = [_image(side, side, side)]
        ours = processor.image_processor(square)["pixel_values"]
        theirs = reference.image_processor(square, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, theirs, atol=atol + 1e-6, rtol=0)
        assert (ours - theirs).abs().mean() < 1e-3


def test_converted_checkpoint_reloads_and_reports(source, converted, llava_pair):
    out, report = converted
    reference, _ = llava_pair
    model, info = mllm.CLOCLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.vision_feature_layer == reference.config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == reference.config.image_seq_length == IMAGE_SEQ_LENGTH
    assert config.image_token_id == reference.config.image_token_id
    # <region> was added to the tokenizer and fits in the padded vocabulary: no resize.
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert report.region_token_added and config.region_token_id == tokenizer.convert_tokens_to_ids("<region>")
    assert config.region_token_id < config.text_config.vocab_size == reference.config.text_config.vocab_size
    assert report.vocab_size_after == report.vocab_size_before
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["renamed"] == len(load_file(source / "model.safetensors")) and saved["dropped"] == {}
    assert all(k.startswith(("model.vision_tower.prompter.", "model.region_projector.")) for k in saved["fresh"])
    assert any(k.startswith("model.region_projector.") for k in saved["fresh"])
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_converted_model_takes_regions(converted, llava_pair):
    _, model = llava_pair
    processor = AutoProcessor.from_pretrained(converted[0])
    text = processor.apply_chat_template(
        _prompt(f"What is {processor.format_region([0.1, 0.2, 0.6, 0.7])}?"), add_generation_prompt=True
    )
    inputs = processor(images=[_image(48, 48, 4)], text=[text])
    assert inputs["region_boxes"].shape == (1, 4)
    with torch.no_grad():
        output = model(**inputs)
    assert output.region_features.shape == (1, model.config.text_config.hidden_size)
    assert torch.isfinite(output.logits).all()
    prompter = model.model.vision_tower.prompter  # freshly initialised as in a new model, not left empty
    assert torch.equal(prompter.layer.norm1.weight, torch.ones_like(prompter.layer.norm1.weight))
    assert 0 < prompter.layer.q_proj.weight.std() < 0.1


def _rename(weights: dict, rename) -> dict:
    return {rename(key): value for key, value in weights.items()}


LAYOUTS = {
    # llava-1.5-7b-hf on the Hub: the ViT under vision_model., plus a stale position_ids buffer.
    "hub": lambda w: {
        **_rename(w, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)),
        "vision_tower.vision_model.embeddings.position_ids": torch.arange(IMAGE_SEQ_LENGTH + 1)[None],
    },
    # transformers 5's in-memory names.
    "in-memory": lambda w: _rename(
        w,
        lambda k: (
            k.replace("language_model.lm_head.", "lm_head.")
            .replace("language_model.model.", "model.language_model.")
            .replace("vision_tower.", "model.vision_tower.")
            .replace("multi_modal_projector.", "model.multi_modal_projector.")
        ),
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_key_layouts_convert_to_the_same_model(source, converted, layout, tmp_path):
    shutil.copytree(source, tmp_path / "src")
    renamed = LAYOUTS[layout](load_file(source / "model.safetensors"))
    save_file(renamed, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    report = convert_llava_hf(tmp_path / "src", tmp_path / "out")
    assert set(report.dropped) == ({"vision_tower.vision_model.embeddings.position_ids"} if layout == "hub" else set())
    expected = load_file(converted[0] / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        if not key.startswith(("model.vision_tower.prompter.", "model.region_projector.")):
            assert torch.equal(got[key], expected[key]), key


def test_embeddings_resized_when_region_does_not_fit(tmp_path):
    save_tiny_llava_hf(tmp_path / "src", vocab_padding=0, seed=1)
    report = convert_llava_hf(tmp_path / "src", tmp_path / "out")
    assert report.vocab_size_after == report.vocab_size_before + 1 == report.region_token_id + 1
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "src").eval()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "src")
    inputs = processor(images=[_image(32, 32, 5)], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    assert got.shape[-1] == expected.shape[-1] + 1
    torch.testing.assert_close(got[..., :-1], expected, atol=1e-5, rtol=0)


def test_sharded_checkpoint_with_tied_embeddings(tmp_path):
    save_tiny_llava_hf(tmp_path / "src", seed=3, tie_word_embeddings=True, max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    report = convert_llava_hf(tmp_path / "src", tmp_path / "out")
    assert report.fresh["lm_head.weight"] == "tied to the input embeddings"
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "src").eval()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    processor = AutoProcessor.from_pretrained(tmp_path / "src")
    inputs = processor(images=[_image(32, 32, 7)], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)


def _copy_with_weights(source, destination, edit) -> None:
    shutil.copytree(source, destination)
    weights = load_file(destination / "model.safetensors")
    edit(weights)
    save_file(weights, destination / "model.safetensors", metadata={"format": "pt"})


def test_missing_unknown_and_pickle_checkpoints_raise(source, tmp_path, capsys):
    _copy_with_weights(source, tmp_path / "missing", lambda w: w.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(ConversionError, match=r"missing keys.*model\.multi_modal_projector\.linear_2\.bias"):
        convert_llava_hf(tmp_path / "missing", tmp_path / "out")

    _copy_with_weights(source, tmp_path / "extra", lambda w: w.update({"image_newline": torch.zeros(64)}))
    with pytest.raises(ConversionError, match=r"unrecognised keys \['image_newline'\]"):
        convert_llava_hf(tmp_path / "extra", tmp_path / "out")

    def shrink(weights):
        weights["multi_modal_projector.linear_1.weight"] = weights["multi_modal_projector.linear_1.weight"][
            :, :32
        ].contiguous()

    _copy_with_weights(source, tmp_path / "shape", shrink)
    with pytest.raises(ConversionError, match="shape mismatches"):
        convert_llava_hf(tmp_path / "shape", tmp_path / "out")

    shutil.copytree(source, tmp_path / "pickle")
    (tmp_path / "pickle" / "model.safetensors").rename(tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        convert_llava_hf(tmp_path / "pickle", tmp_path / "out")

    with pytest.raises(ConversionError, match="expected a CLOC encoder checkpoint"):
        convert_llava_hf(source, tmp_path / "out", cloc=source)

    assert main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "missing keys" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # A folder that is not a model: one line naming the file, exit 2 (not transformers' traceback).
    (tmp_path / "notes").mkdir()
    assert main(["--src", str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'notes'}: no config.json; --src must be a llava-hf checkpoint folder"
    )
    (tmp_path / "notes" / "config.json").write_text("{not json")
    assert main(["--src", str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path / 'notes' / 'config.json'}: not a transformers model config")
        and err.count("\n") == 1
    )


def _save_cloc(path, width: int) -> CLOCModel:
    torch.manual_seed(2)
    cloc = build_cloc_model(
        "tiny",
        vision_config={"num_hidden_layers": 2, "image_size": IMAGE_SIZE, "hidden_size": width},
        text_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64},
        projection_dim=32,
    )
    cloc.save_pretrained(path)
    return cloc


def test_cloc_swap_keeps_projector_and_language_model(source, llava_pair, tmp_path, capsys):
    reference, _ = llava_pair
    cloc = _save_cloc(tmp_path / "cloc", width=64)
    out = tmp_path / "swapped"
    assert main(["--src", str(source), "--out", str(out), "--cloc", str(tmp_path / "cloc")]) == 0
    assert "from the CLOC checkpoint" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    tower = model.model.vision_tower.state_dict()
    expected_tower = {k: v for k, v in cloc.state_dict().items() if k.startswith(("vision_model.", "prompter."))}
    assert tower.keys() == expected_tower.keys()
    for key, value in expected_tower.items():
        assert torch.equal(tower[key], value), key
    converted = model.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith(("model.language_model.", "lm_head.", "model.multi_modal_projector.")):
            assert torch.equal(converted[key], value), key
    assert model.config.vision_config.prompter_pool == cloc.config.prompter_pool
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.resize_mode == "pad"  # CLOC's recipe: boxes are never cropped away
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["from_cloc"] == len(expected_tower)
    assert all(k.startswith("vision_tower.") for k in report["dropped"])
    assert any(k.startswith("text_model.") for k in report["cloc_dropped"])
    assert all(k.startswith("model.region_projector.") for k in report["fresh"])


def test_cloc_swap_with_another_width_needs_reinit_projector(source, llava_pair, tmp_path):
    reference, _ = llava_pair
    _save_cloc(tmp_path / "cloc", width=32)
    with pytest.raises(ConversionError, match="reinit-projector"):
        convert_llava_hf(source, tmp_path / "out", cloc=tmp_path / "cloc")
    report = convert_llava_hf(source, tmp_path / "out", cloc=tmp_path / "cloc", reinit_projector=True)
    assert report.projector == "re-initialised"
    assert any(k.startswith("multi_modal_projector.") for k in report.dropped)
    assert any(k.startswith("model.multi_modal_projector.") for k in report.fresh)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert model.model.multi_modal_projector.linear_1.weight.shape == (64, 32)
    converted = model.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith(("model.language_model.", "lm_head.")):
            assert torch.equal(converted[key], value), key
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    text = processor.apply_chat_template(_prompt("What is it?"), add_generation_prompt=True)
    with torch.no_grad():
        output = model(**processor(images=[_image(40, 30, 6)], text=[text]))
    assert torch.isfinite(output.logits).all()
