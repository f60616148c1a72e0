"""CLOC-LLaVA model: forward/loss, placeholder filling and checks, save/load through the Auto classes, generation."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

from cloc_encoder import CLOCModel
from cloc_encoder.compat import enable_activation_checkpointing
from mllm import CLOCLlavaConfig, CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, CLOCVisionTower
from mllm.modeling_cloc_llava import merge_patch_tokens
from mllm.regions import expand_regions
from mllm.tiny import tiny_config
from mllm.tokenization import add_mllm_tokens
from tests.numerics import assert_close_across_instances


def _image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _build(chat_tokenizer, attn_implementation: str = "sdpa"):
    # A wider init than the default 0.02 so greedy outputs depend on the prompt (a near-flat random model would
    # repeat the same tokens for every input and make the generation tests vacuous).
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, text_config={"initializer_range": 0.2})
    model = CLOCLlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()
    return model, CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)


@pytest.fixture()
def model_and_processor(chat_tokenizer):
    return _build(chat_tokenizer)


def _prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _capture_inputs_embeds(model):
    captured = {}

    def hook(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    return captured, handle


def test_forward_loss_backward(model_and_processor):
    model, processor = model_and_processor
    model.train()
    region = processor.format_region([0.1, 0.2, 0.6, 0.7])
    texts = [_prompt(processor, f"What is {region}?") + " A red circle.</s>", _prompt(processor, "Describe it.")]
    inputs = processor(images=[_image(48, 32, 0), _image(32, 40, 1)], text=texts, padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    output = model(**inputs, labels=labels)
    assert output.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    assert output.image_features.shape == (2, model.config.image_seq_length, 64)
    assert output.region_features.shape == (1, 64)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name in ("multi_modal_projector.linear_1", "region_projector.linear_2", "vision_tower.prompter.layer.q_proj"):
        assert model.model.get_submodule(name).weight.grad.abs().sum() > 0, name
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_and_bfloat16(model_and_processor):
    model, processor = model_and_processor
    prompt = _prompt(processor, f"What is {processor.format_region([0.1, 0.2, 0.6, 0.7])}?") + " A cat.</s>"
    inputs = processor(images=[_image(48, 32, 0)], text=[prompt])
    with torch.no_grad():
        reference = model(**inputs, labels=inputs["input_ids"]).loss
    model.train()
    enable_activation_checkpointing(model)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference)
    assert model.model.region_projector.linear_1.weight.grad.abs().sum() > 0
    half = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        logits = half(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_placeholders_are_filled_with_projected_features(model_and_processor):
    model, processor = model_and_processor
    boxes = [[[0.1, 0.2, 0.6, 0.7], [0.5, 0.5, 0.9, 0.95]], [[0.0, 0.0, 1.0, 1.0]]]
    texts = [
        _prompt(
            processor, f"Compare {processor.format_region(boxes[0][0])} and {processor.format_region(boxes[0][1])}."
        ),
        _prompt(processor, f"What is {processor.format_region(boxes[1][0])}?"),
    ]
    inputs = processor(images=[_image(48, 32, 0), _image(32, 40, 1)], text=texts, padding=True)
    captured, handle = _capture_inputs_embeds(model)
    with torch.no_grad():
        model(**inputs)
        flat_embeds = captured["inputs_embeds"]
        # The list-per-sample layout gives the same embeddings.
        per_sample = [inputs["region_boxes"][:2], inputs["region_boxes"][2:]]
        model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            region_boxes=per_sample,
        )
        assert torch.equal(captured["inputs_embeds"], flat_embeds)
        handle.remove()

        tower = model.model.vision_tower
        state = tower.encode_images(inputs["pixel_values"])
        expected_image = model.model.multi_modal_projector(state.hidden_states[-2][:, 1:])
        pooled, _ = tower.region_features(state, inputs["region_boxes"], inputs["region_image_index"])
        expected_region = model.model.region_projector(pooled)
    ids = inputs["input_ids"]
    image_positions = (ids == model.config.image_token_id).nonzero()
    assert len(image_positions) == 2 * model.config.image_seq_length
    torch.testing.assert_close(flat_embeds[ids == model.config.image_token_id], expected_image.reshape(-1, 64))
    region_embeds = flat_embeds[ids == model.config.region_token_id]
    torch.testing.assert_close(region_embeds, expected_region)
    # The i-th <region> of a sample gets its i-th box: the two regions of sample 0 differ.
    assert not torch.allclose(region_embeds[0], region_embeds[1])
    # Text positions keep their token embeddings.
    text_mask = (ids != model.config.image_token_id) & (ids != model.config.region_token_id)
    torch.testing.assert_close(flat_embeds[text_mask], model.get_input_embeddings()(ids)[text_mask])


def test_count_mismatches_raise_clear_errors(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(
        images=[_image(32, 32, 0)],
        text=[_prompt(processor, f"What is {processor.format_region([0.1, 0.1, 0.5, 0.5])}?")],
    )
    ids = inputs["input_ids"]
    image_id, region_id = model.config.image_token_id, model.config.region_token_id
    fewer = ids[ids != image_id][None].clone()
    fewer = torch.cat([ids[:, :1], torch.full((1, model.config.image_seq_length - 1), image_id), fewer[:, 1:]], dim=1)
    with pytest.raises(ValueError, match=r"<image> tokens and features do not match: 15 tokens .* but 16 features"):
        model(
            input_ids=fewer,
            pixel_values=inputs["pixel_values"],
            region_boxes=inputs["region_boxes"],
            region_image_index=inputs["region_image_index"],
        )
    with pytest.raises(ValueError, match=r"<region> tokens and features do not match: 1 tokens .* but 2 features"):
        model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            region_boxes=inputs["region_boxes"].repeat(2, 1),
            region_image_index=torch.zeros(2, dtype=torch.long),
        )
    with pytest.raises(ValueError, match=r"sample 0: 1 <region> tokens but 0 region boxes"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"], region_boxes=[torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"1 <region> tokens .* but no region_boxes"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"<image> tokens .* but no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="region_image_index refers to image 3"):
        model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            region_boxes=inputs["region_boxes"],
            region_image_index=torch.tensor([3]),
        )
    assert region_id in ids


def test_vision_tower_equals_cloc_encoder(tmp_path, model_and_processor):
    model, _ = model_and_processor
    torch.manual_seed(3)
    cloc = CLOCModel(model.config.vision_config).eval()
    cloc.save_pretrained(tmp_path / "cloc")
    pixels = torch.randn(2, 3, 32, 32)
    boxes, index = (
        torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.3, 1.0, 0.9], [0.4, 0.4, 0.6, 0.8]]),
        torch.tensor([0, 1, 1]),
    )
    with torch.no_grad():
        reference_state = cloc.encode_images(pixels)
        reference = cloc.region_features(reference_state, boxes, index)
        for tower in (CLOCVisionTower.from_cloc(cloc).eval(), CLOCVisionTower.from_cloc(tmp_path / "cloc").eval()):
            state = tower.encode_images(pixels)
            assert_close_across_instances(state.patch_tokens, reference_state.patch_tokens)
            for got, want in zip(tower.region_features(state, boxes, index), reference, strict=True):
                assert_close_across_instances(got, want)
    assert not any(name.startswith(("text_model", "box_head")) for name, _ in tower.named_parameters())
    with pytest.raises(ValueError, match="not a CLOC encoder checkpoint"):
        CLOCVisionTower.from_cloc(_save_tiny(tmp_path / "mllm", model))


def _save_tiny(path, model):
    model.save_pretrained(path)
    return path


def test_save_load_through_auto_classes(tmp_path, model_and_processor):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, CLOCLlavaConfig) and config.image_seq_length == model.config.image_seq_length
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is CLOCLlavaForConditionalGeneration
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded_processor) is CLOCLlavaProcessor
    assert reloaded_processor.chat_template == processor.chat_template
    assert (reloaded_processor.image_seq_length, reloaded_processor.box_codec) == (16, "int999")

    prompt = _prompt(processor, f"What is {processor.format_region([0.2, 0.1, 0.7, 0.9])}?")
    inputs = processor(images=[_image(40, 30, 2)], text=[prompt])
    again = reloaded_processor(
        images=[_image(40, 30, 2)],
        text=[
            reloaded_processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": f"What is {processor.format_region([0.2, 0.1, 0.7, 0.9])}?"},
                        ],
                    }
                ],
                add_generation_prompt=True,
            )
        ],
    )
    for key in inputs:
        assert torch.equal(inputs[key], again[key]), key
    with torch.no_grad():
        assert_close_across_instances(model(**inputs).logits, reloaded(**inputs).logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert_close_across_instances(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


def _generate(model, inputs, **kwargs):
    suppress = [model.config.image_token_id, model.config.region_token_id]
    options = {"max_new_tokens": 8, "do_sample": False, "suppress_tokens": suppress, "pad_token_id": 3}
    options.update(kwargs)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    return output[:, inputs["input_ids"].shape[1] :]


def test_generate_with_cache_equals_without(model_and_processor):
    model, processor = model_and_processor
    prompt = _prompt(processor, f"What is {processor.format_region([0.25, 0.25, 0.75, 0.75])}?")
    inputs = processor(images=[_image(36, 48, 4)], text=[prompt])
    with_cache = _generate(model, inputs, use_cache=True, min_new_tokens=8)
    assert with_cache.shape == (1, 8)
    assert torch.equal(with_cache, _generate(model, inputs, use_cache=False, min_new_tokens=8))
    # Region boxes as a list per sample generate the same tokens.
    per_sample = {k: v for k, v in inputs.items() if k != "region_image_index"}
    per_sample["region_boxes"] = [inputs["region_boxes"]]
    assert torch.equal(with_cache, _generate(model, per_sample, min_new_tokens=8))


def test_streaming_yields_the_generated_text(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(images=[_image(32, 32, 5)], text=[_prompt(processor, "What is this?")])
    tokens = _generate(model, inputs, min_new_tokens=8)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(
        target=_generate, args=(model, inputs), kwargs={"streamer": streamer, "min_new_tokens": 8}
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == processor.batch_decode(tokens, skip_special_tokens=True)[0]
    assert streamed


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_batched_left_padded_generation_equals_batch_of_one(chat_tokenizer, attn_implementation):
    model, processor = _build(chat_tokenizer, attn_implementation)
    assert model.model.language_model.config._attn_implementation == attn_implementation
    images = [_image(48, 32, 6), _image(32, 32, 7), _image(30, 44, 8)]
    questions = [
        "Hi?",
        "Where is the small red circle in this picture, please?",
        f"What is {processor.format_region([0.1, 0.5, 0.4, 0.9])}?",
    ]
    prompts = [_prompt(processor, q) for q in questions]
    batch = processor(images=images, text=prompts, padding=True, padding_side="left")
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3
    batched = _generate(model, batch, max_new_tokens=10, min_new_tokens=10)
    singles = [
        _generate(model, processor(images=[images[i]], text=[prompts[i]]), max_new_tokens=10, min_new_tokens=10)[0]
        for i in range(3)
    ]
    for i in range(3):
        assert torch.equal(batched[i], singles[i]), i
    assert len({tuple(t.tolist()) for t in singles}) == 3  # outputs depend on the prompt: the test is not vacuous
    # Control: attending to the padding changes the shortest prompt's answer, so the check above can fail.
    leaky = _generate(
        model,
        {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])},
        max_new_tokens=10,
        min_new_tokens=10,
    )
    assert not torch.equal(leaky[lengths.argmin()], singles[int(lengths.argmin())])


def test_beam_search_expands_regions(model_and_processor):
    model, processor = model_and_processor
    region = processor.format_region([0.1, 0.5, 0.4, 0.9])
    other = processor.format_region([0.6, 0.0, 1.0, 0.3])
    prompts = [_prompt(processor, f"What is {region}?"), _prompt(processor, f"Is {other} left of {region}?")]
    images = [_image(32, 32, 9), _image(40, 30, 10)]
    batch = processor(images=images, text=prompts, padding=True, padding_side="left")
    options = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 4, "min_new_tokens": 4}
    batched = _generate(model, batch, **options)
    assert batched.shape == (4, 4)
    for i in range(2):
        single = _generate(model, processor(images=[images[i]], text=[prompts[i]]), **options)
        assert torch.equal(batched[2 * i : 2 * i + 2], single), i
    # Exact check of the expansion: copy j of sample i sees sample i's embeddings, regions included.
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    ids, expanded_kwargs = model._expand_inputs_for_generation(expand_size=2, input_ids=batch["input_ids"], **kwargs)
    captured, handle = _capture_inputs_embeds(model)
    with torch.no_grad():
        model(**batch)
        reference = captured["inputs_embeds"]
        model(input_ids=ids, **expanded_kwargs)
    handle.remove()
    torch.testing.assert_close(captured["inputs_embeds"], reference.repeat_interleave(2, dim=0))

    boxes = torch.arange(12.0).view(3, 4)
    expanded, index = expand_regions(boxes, torch.tensor([0, 1, 1]), 2)
    assert index.tolist() == [0, 1, 2, 2, 3, 3]
    assert torch.equal(expanded, boxes[[0, 0, 1, 2, 1, 2]])
    with pytest.raises(ValueError, match="needs region_image_index sorted"):
        expand_regions(boxes, torch.tensor([1, 0, 1]), 2)


@pytest.mark.parametrize(
    ("overrides", "sequence_length"),
    [
        ({"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}, 17),
        ({"projector_type": "linear", "region_projector_type": "linear", "region_feature": "embedding"}, 16),
        ({"vision_feature_layer": [0, -2]}, 16),  # several layers, concatenated along the channels
    ],
)
def test_feature_options(chat_tokenizer, overrides, sequence_length):
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, **overrides)
    assert config.image_seq_length == sequence_length
    model = CLOCLlavaForConditionalGeneration(config).eval()
    processor = CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)
    inputs = processor(
        images=[_image(32, 32, 11)], text=[_prompt(processor, f"Is {processor.format_region([0, 0, 0.5, 0.5])}?")]
    )
    with torch.no_grad():
        output = model(**inputs)
        state = model.model.vision_tower.encode_images(inputs["pixel_values"])
        layer = torch.cat([state.hidden_states[i] for i in config.feature_layers], dim=-1)
        assert layer.shape[-1] == config.image_feature_size == 64 * len(config.feature_layers)
        selected = layer if config.vision_feature_select_strategy == "full" else layer[:, 1:]
        torch.testing.assert_close(output.image_features, model.model.multi_modal_projector(selected))
    assert output.region_features.shape == (1, 64)
    assert ("linear_2" in dict(model.model.multi_modal_projector.named_children())) == (
        config.projector_type != "linear"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"projector_type": "mlp3x"}, "CLOCLlavaConfig.projector_type='mlp3x'"),
        ({"region_feature": "roi"}, "CLOCLlavaConfig.region_feature='roi'"),
        ({"box_codec": "ints"}, "CLOCLlavaConfig.box_codec='ints'"),
        ({"vision_feature_layer": 3}, r"CLOCLlavaConfig.vision_feature_layer=3 .* 2-layer ViT"),
        ({"vision_feature_layer": [0, 3]}, r"CLOCLlavaConfig.vision_feature_layer=\[0, 3\] .* 2-layer ViT"),
        ({"vision_feature_layer": []}, r"CLOCLlavaConfig.vision_feature_layer=\[\]"),
        ({"image_seq_length": 576}, "CLOCLlavaConfig.image_seq_length=576 but the vision tower gives 16"),
        ({"region_token_id": 4}, "CLOCLlavaConfig.region_token_id=4 equals image_token_id"),
        ({"image_token_merge": 3}, r"CLOCLlavaConfig.image_token_merge=3: .* 4 x 4 patch grid"),
        ({"image_token_merge": 0}, r"CLOCLlavaConfig.image_token_merge=0: "),
        (
            {"image_token_merge": 2, "vision_feature_select_strategy": "full"},
            "image_token_merge > 1 merges patches only",
        ),
    ],
)
def test_config_validation_names_the_field(chat_tokenizer, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(chat_tokenizer, **overrides)


def test_merge_patch_tokens_concatenates_each_block_of_neighbours():
    grid, merge, channels = 4, 2, 3
    tokens = torch.arange(2 * grid * grid * channels, dtype=torch.float32).reshape(2, grid * grid, channels)
    merged = merge_patch_tokens(tokens, merge)
    assert merged.shape == (2, 4, merge * merge * channels)
    for block_row in range(grid // merge):
        for block_col in range(grid // merge):
            patches = [
                (block_row * merge + r) * grid + block_col * merge + c for r in range(merge) for c in range(merge)
            ]
            expected = torch.cat([tokens[:, p] for p in patches], dim=-1)
            assert torch.equal(merged[:, block_row * (grid // merge) + block_col], expected)
    assert torch.equal(merge_patch_tokens(tokens.bfloat16(), merge), merged.bfloat16())
    with pytest.raises(ValueError, match="cannot merge 3 x 3 patches of a 16-patch image"):
        merge_patch_tokens(tokens, 3)


def test_image_token_merge_feeds_the_llm_fewer_tokens(chat_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(chat_tokenizer, image_token_merge=2)
    assert config.image_seq_length == 4 and config.image_projector_input_size == 4 * config.image_feature_size
    assert config.image_token_grid_size == 2 and tiny_config(chat_tokenizer).image_token_grid_size == 4
    model = CLOCLlavaForConditionalGeneration(config).eval()
    processor = CLOCLlavaProcessor.from_model_config(config, chat_tokenizer)
    inputs = processor(images=[_image(32, 32, 5)], text=[_prompt(processor, "Where is it?")])
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 4
    with torch.no_grad():
        output = model(**inputs)
        state = model.model.vision_tower.encode_images(inputs["pixel_values"])
        patches = state.hidden_states[config.vision_feature_layer][:, 1:]
        expected = model.model.multi_modal_projector(merge_patch_tokens(patches, 2))
    torch.testing.assert_close(output.image_features, expected)
    assert output.logits.shape[1] == inputs["input_ids"].shape[1]


def test_adding_placeholder_tokens_to_a_plain_tokenizer(caption_tokenizer, chat_tokenizer):
    plain = copy.deepcopy(caption_tokenizer)  # keep the session fixture untouched
    before = len(plain)
    ids = add_mllm_tokens(plain)
    assert ids["vocab_size"] == before + 2
    assert plain.convert_ids_to_tokens([ids["image_token_id"], ids["region_token_id"]]) == ["<image>", "<region>"]
    assert add_mllm_tokens(plain) == ids  # idempotent
    torch.manual_seed(0)
    model = CLOCLlavaForConditionalGeneration(tiny_config(chat_tokenizer))
    model.resize_token_embeddings(len(chat_tokenizer) + 5)
    assert model.get_input_embeddings().weight.shape[0] == len(chat_tokenizer) + 5
    assert model.lm_head.weight.shape[0] == len(chat_tokenizer) + 5
