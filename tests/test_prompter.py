"""The prompter's shared key/value fast path equals the plain layer (``cloc_encoder.prompter``)."""

from __future__ import annotations

import pytest
import torch

from cloc_encoder.prompter import PrompterLayer

WIDTH, PATCHES = 48, 20


def _plain_prompt_outputs(layer: PrompterLayer, prompts, image_tokens, image_index, image_bias=None) -> torch.Tensor:
    """The plain layer over ``[prompts; image tokens]`` for each region, kept at the prompt positions."""
    tokens = torch.cat([prompts, image_tokens[image_index]], dim=1)
    full = layer(tokens, num_prompts=prompts.shape[1], image_bias=image_bias)
    return full[:, : prompts.shape[1]]


@pytest.mark.parametrize("num_prompts", [1, 2])  # text prompts (1 token) and box prompts (2 corners)
@pytest.mark.parametrize(
    "image_index",
    [
        [0, 0, 0, 2, 3, 3, 3, 3, 3],  # 3, 0, 1 and 5 regions: an image without regions
        [3, 0, 2, 3, 0, 3, 3, 0, 3],  # the same counts, interleaved
        [1],
        [],
    ],
)
def test_forward_prompts_equals_plain_layer(num_prompts, image_index):
    torch.manual_seed(0)
    layer = PrompterLayer(WIDTH, mlp_ratio=4.0).eval()
    for parameter in layer.parameters():  # non-trivial norms and biases
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    image_tokens = 3.0 * torch.randn(4, PATCHES, WIDTH)
    index = torch.tensor(image_index, dtype=torch.long)
    prompts = torch.randn(len(index), num_prompts, WIDTH)
    with torch.no_grad():
        keys, values = layer.image_key_values(image_tokens)
        fast = layer.forward_prompts(prompts, keys, values, index)
        plain = _plain_prompt_outputs(layer, prompts, image_tokens, index)
    assert fast.shape == (len(index), num_prompts, WIDTH)
    if len(index):
        assert (fast - plain).abs().max().item() < 1e-5


def test_fast_path_gradients_match_plain_layer():
    torch.manual_seed(1)
    layer = PrompterLayer(WIDTH, mlp_ratio=2.0)
    image_tokens = torch.randn(2, PATCHES, WIDTH)
    index = torch.tensor([1, 0, 1])
    prompts = torch.randn(3, 2, WIDTH)
    grads = []
    for fast in (True, False):
        layer.zero_grad()
        if fast:
            output = layer.forward_prompts(prompts, *layer.image_key_values(image_tokens), index)
        else:
            output = _plain_prompt_outputs(layer, prompts, image_tokens, index)
        output.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_model_region_embeddings_pool_the_plain_layer_prompt_outputs(tiny_cloc):
    """With ``prompter_pool="prompts"`` the model pools the plain layer's prompt outputs (cached keys reused)."""
    prompter = tiny_cloc.prompter
    state = tiny_cloc.encode_images(torch.randn(3, 3, 32, 32))
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.0, 0.2, 1.0, 0.9], [0.3, 0.3, 0.4, 0.8], [0.5, 0.0, 1.0, 0.5]])
    index = torch.tensor([2, 0, 2, 2])
    with torch.no_grad():
        first = tiny_cloc.region_embeddings(state, boxes, index)
        again = tiny_cloc.region_embeddings(state, boxes, index)  # uses state.key_values
        prompts = prompter.box_prompts(boxes)
        bias = prompter.box_attention_bias(boxes, state.patch_tokens.shape[1])
        plain = _plain_prompt_outputs(prompter.layer, prompts, state.patch_tokens, index, bias)
        expected = prompter.embed(prompter.pool_norm(plain.mean(dim=1)))
    assert state.key_values is not None
    assert torch.equal(first, again)
    assert (first - expected).abs().max().item() < 1e-5


def test_fast_path_with_key_positions_and_box_bias_equals_plain_layer():
    from cloc_encoder.prompter import SinusoidalPointEncoder

    torch.manual_seed(2)
    layer = PrompterLayer(WIDTH, mlp_ratio=2.0, key_position_encoder=SinusoidalPointEncoder(8, 8.0)).eval()
    image_tokens = torch.randn(3, 16, WIDTH)  # a 4×4 patch grid
    index = torch.tensor([2, 0, 2, 2, 1])
    prompts = torch.randn(5, 2, WIDTH)
    bias = 4.0 * (torch.rand(5, 16) > 0.5).float()
    with torch.no_grad():
        fast = layer.forward_prompts(prompts, *layer.image_key_values(image_tokens), index, bias)
        plain = layer(torch.cat([prompts, image_tokens[index]], dim=1), num_prompts=2, image_bias=bias)[:, :2]
        unbiased = layer.forward_prompts(prompts, *layer.image_key_values(image_tokens), index)
    assert (fast - plain).abs().max().item() < 1e-5
    assert (fast - unbiased).abs().max().item() > 1e-3  # the bias changes what the prompts attend to


def test_box_attention_bias_marks_the_patches_inside_the_box(tiny_cloc):
    prompter = tiny_cloc.prompter
    value = tiny_cloc.config.prompter_box_attention_bias
    assert value > 0
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.6, 0.6, 0.9, 0.9]])
    bias = prompter.box_attention_bias(boxes, 16).view(2, 4, 4)  # 4×4 grid, centres at 1/8, 3/8, 5/8, 7/8
    assert torch.equal(bias[0], value * torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4))
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = value  # centres 5/8 and 7/8 lie in [0.6, 0.9] on both axes
    assert torch.equal(bias[1], expected)
    with_cls = prompter.box_attention_bias(boxes, 17)
    assert with_cls.shape == (2, 17) and torch.equal(with_cls[:, 0], torch.zeros(2))
    with pytest.raises(ValueError, match="square patch grid"):
        prompter.box_attention_bias(boxes, 15)


def test_text_attention_geometry_reads_where_the_prompt_looks(tiny_cloc):
    """Uniform attention → centred mean and the grid's spread; attention on one patch → that patch's centre."""
    prompter = tiny_cloc.prompter
    image_tokens = torch.randn(1, 16, tiny_cloc.config.vision_width)  # 4×4 grid
    texts = torch.randn(2, tiny_cloc.config.projection_dim)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        prompter.layer.q_proj.weight.zero_()
        prompter.layer.q_proj.bias.zero_()  # zero queries: uniform attention
        _, geometry = prompter.text_features(texts, image_tokens, index)
        spread = torch.tensor([0.125, 0.375, 0.625, 0.875]).std(unbiased=False)
        torch.testing.assert_close(geometry, torch.tensor([[0.0, 0.0, 4 * spread, 4 * spread]] * 2))

        keys, values = prompter.layer.image_key_values(image_tokens)
        keys = torch.zeros_like(keys)
        keys[0, 6] = 1e4  # only patch (row 1, col 2) answers any query
        prompter.layer.q_proj.bias.fill_(1.0)
        _, geometry = prompter.text_features(texts, image_tokens, index, (keys, values))
        torch.testing.assert_close(geometry[:, :2], torch.tensor([[4 * (0.625 - 0.5), 4 * (0.375 - 0.5)]] * 2))
