"""CLOC encoder: CLIP/SigLIP equivalence, save/load, Auto classes, forward and loss bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

import cloc_encoder
from cloc_encoder import CLOCModel
from cloc_encoder.factory import load_from_clip
from tests.numerics import assert_close_across_instances

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


def _tiny_clip(tmp_path):
    config = CLIPConfig(
        text_config={
            **TOWER,
            "num_hidden_layers": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={**TOWER, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(1)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    return model, tmp_path / "clip"


def _token_ids(batch: int, length: int, eos: int = 3, vocab_size: int = 99) -> torch.Tensor:
    ids = torch.randint(4, vocab_size, (batch, length))
    ids[:, -1] = eos
    return ids


def test_clip_checkpoint_gives_identical_embeddings(tmp_path):
    clip, path = _tiny_clip(tmp_path)
    cloc = load_from_clip(path).eval()
    pixels, ids = torch.randn(3, 3, 32, 32), _token_ids(3, 10)
    with torch.no_grad():
        clip_image = clip.get_image_features(pixel_values=pixels).pooler_output
        clip_text = clip.get_text_features(input_ids=ids).pooler_output
        assert_close_across_instances(cloc.get_image_features(pixels), clip_image)
        assert_close_across_instances(cloc.get_text_features(ids), clip_text)
        assert torch.equal(cloc.logit_scale, clip.logit_scale)
        # f_I'(x): last-layer patch tokens before the final norm (CLS dropped).
        state = cloc.encode_images(pixels)
        reference = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        assert_close_across_instances(state.patch_tokens, reference)
    # The new CLOC parts are initialised, not garbage.
    assert torch.equal(cloc.prompter.layer.norm1.weight, torch.ones(32))
    assert cloc.prompter.layer.q_proj.weight.abs().max() < 1.0


def test_siglip_checkpoint_gives_identical_embeddings(tmp_path):
    config = SiglipConfig(
        text_config={**TOWER, "num_hidden_layers": 1, "vocab_size": 99, "max_position_embeddings": 12},
        vision_config={**TOWER, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(2)
    siglip = SiglipModel(config).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    cloc = load_from_clip(tmp_path / "siglip").eval()
    assert cloc.config.backbone == "siglip" and cloc.config.contrastive_loss == "sigmoid"
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, 99, (2, 12))
    with torch.no_grad():
        assert_close_across_instances(
            cloc.get_image_features(pixels), siglip.get_image_features(pixel_values=pixels).pooler_output
        )
        assert_close_across_instances(
            cloc.get_text_features(ids), siglip.get_text_features(input_ids=ids).pooler_output
        )
        assert torch.equal(cloc.logit_bias, siglip.logit_bias)
        assert cloc.encode_images(pixels).patch_tokens.shape == (2, 16, 32)  # SigLIP has no CLS token


def test_load_from_clip_rejects_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected a 'clip' or 'siglip' checkpoint"):
        load_from_clip(tmp_path)


def test_save_load_round_trip_and_auto_classes(tmp_path, tiny_cloc):
    tiny_cloc.save_pretrained(tmp_path / "cloc")
    files = {p.name for p in (tmp_path / "cloc").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "cloc"), cloc_encoder.CLOCConfig)
    reloaded = AutoModel.from_pretrained(tmp_path / "cloc").eval()
    assert isinstance(reloaded, CLOCModel)
    for (name, a), (_, b) in zip(tiny_cloc.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    pixels = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9]])
    with torch.no_grad():
        a = tiny_cloc.region_embeddings(tiny_cloc.encode_images(pixels), boxes, torch.tensor([0, 1]))
        b = reloaded.region_embeddings(reloaded.encode_images(pixels), boxes, torch.tensor([0, 1]))
    assert_close_across_instances(a, b)


def _batch(model, num_images=3, regions_per_image=(2, 0, 1)):
    torch.manual_seed(3)
    pixels = torch.randn(num_images, 3, 32, 32)
    vocab = model.config.text_config.vocab_size
    ids = _token_ids(num_images, 16, vocab_size=vocab)
    boxes, index = [], []
    for image, count in enumerate(regions_per_image):
        for _ in range(count):
            xy = torch.rand(2) * 0.5
            boxes.append(torch.cat([xy, xy + 0.2 + torch.rand(2) * 0.3]))
            index.append(image)
    region_ids = _token_ids(len(boxes), 16, vocab_size=vocab)
    return {
        "pixel_values": pixels,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "region_boxes": torch.stack(boxes),
        "region_image_index": torch.tensor(index),
        "region_input_ids": region_ids,
        "region_attention_mask": torch.ones_like(region_ids),
    }


def test_forward_loss_terms_and_lambda(tiny_cloc):
    batch = _batch(tiny_cloc)
    output = tiny_cloc(**batch)
    # λ = images with region captions / batch size = 2 / 3.
    assert output.region_weight == pytest.approx(2 / 3)
    expected = output.loss_clip + output.region_weight * (
        output.loss_region + tiny_cloc.config.grounding_weight * output.loss_grounding
    )
    assert torch.allclose(output.loss, expected)
    # Grounding: squared error summed over the 4 coordinates, divided by 4·M·N.
    squared = ((output.predicted_boxes - batch["region_boxes"]) ** 2).sum()
    assert torch.allclose(output.loss_grounding, squared / (4 * tiny_cloc.config.max_regions_per_image * 3))
    output.loss.backward()
    missing = [n for n, p in tiny_cloc.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] or all("logit_bias" in n for n in missing)


def test_forward_without_regions_is_clip_loss(tiny_cloc):
    batch = _batch(tiny_cloc)
    for key in ("region_boxes", "region_image_index", "region_input_ids", "region_attention_mask"):
        batch.pop(key)
    output = tiny_cloc(**batch)
    assert output.region_weight == 0.0
    assert torch.allclose(output.loss, output.loss_clip)
    output.loss.backward()
    assert tiny_cloc.prompter.layer.q_proj.weight.grad is not None  # still in the graph (DDP / ZeRO)


def test_region_embeddings_accept_both_layouts_and_check_shapes(tiny_cloc):
    state = tiny_cloc.encode_images(torch.randn(2, 3, 32, 32))
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 1.0, 1.0]])]
    with torch.no_grad():
        listed = tiny_cloc.region_embeddings(state, boxes)
        flat = tiny_cloc.region_embeddings(state, torch.cat(boxes), torch.tensor([0, 1, 1]))
    assert listed.shape == (3, 32) and torch.allclose(listed, flat)
    with pytest.raises(ValueError, match="image_index"):
        tiny_cloc.region_embeddings(state, torch.cat(boxes))
    with pytest.raises(ValueError, match="only 2 were encoded"):
        tiny_cloc.region_embeddings(state, torch.cat(boxes), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        tiny_cloc.region_embeddings(state, torch.rand(3, 5), torch.tensor([0, 1, 1]))


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="prompter_pool"):
        cloc_encoder.CLOCConfig(prompter_pool="cls")
    with pytest.raises(ValueError, match="does not match the vision tower"):
        cloc_encoder.CLOCConfig(
            vision_config={"model_type": "siglip_vision_model"}, text_config={"model_type": "clip_text_model"}
        )
