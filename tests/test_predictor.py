"""CLOCPredictor: encode once, prompt many, boxes in the original frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from cloc_encoder.predictor import CLOCPredictor


@pytest.fixture()
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, size=(40, 80, 3), dtype=np.uint8)  # wide: padded
    return Image.fromarray(pixels)


def test_predictor_matches_the_batched_model_path(tiny_cloc, caption_tokenizer, image):
    predictor = CLOCPredictor(tiny_cloc, caption_tokenizer)
    boxes = [[0.0, 0.0, 0.5, 1.0], [0.25, 0.1, 0.9, 0.6], [0.6, 0.5, 1.0, 1.0]]
    predictor.set_image(image)
    embeds = predictor.region_embeddings(boxes)

    batch = predictor.processor([image], boxes=[boxes])
    with torch.no_grad():
        state = tiny_cloc.encode_images(batch["pixel_values"])
        expected = F.normalize(tiny_cloc.region_embeddings(state, batch["boxes"]), dim=-1)
    assert embeds.shape == (3, tiny_cloc.config.projection_dim)
    torch.testing.assert_close(embeds, expected)
    # Different boxes on the same image give different embeddings (the prompter reads the box).
    assert not torch.allclose(embeds[0], embeds[1])


def test_classify_and_ground_in_the_original_frame(tiny_cloc, caption_tokenizer, image):
    predictor = CLOCPredictor(tiny_cloc, caption_tokenizer)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict_boxes(["a red circle"])
    predictor.set_image(image)
    names, probabilities = predictor.classify_regions([[0.1, 0.1, 0.4, 0.9]], ["red circle", "blue square"])
    assert names[0] in {"red circle", "blue square"}
    assert probabilities.shape == (1, 2)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(1))

    boxes = predictor.predict_boxes(["a red circle", "the blue square left of the circle"])
    assert boxes.shape == (2, 4)
    assert ((boxes >= 0) & (boxes <= 1)).all()
    # Same numbers as the model-frame head output mapped back through the image's frame transform.
    tokens = caption_tokenizer(["a red circle"], padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = tiny_cloc.encode_text(tokens["input_ids"], tokens["attention_mask"])
        model_box = tiny_cloc.predict_boxes(predictor._state, text.text_embeds, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(boxes[:1], predictor._transform.boxes_to_original(model_box))
