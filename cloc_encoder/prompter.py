"""The CLOC prompter: turns a box (or a text) into a region embedding over one ViT pass's patch tokens.

Paper: each box corner is a sinusoidal encoding of its normalised coordinates mapped to ViT width; the prompt
tokens are prepended to the pre-norm patch tokens ``f_I'(x)`` and go through one single-head transformer encoder
layer of ViT width; a global average pool and a linear projection give the region embedding. A text prompt (the
region caption's embedding mapped to ViT width) goes through the same layer and feeds the box head.

Coordinates here are in the **model frame**: ``xyxy`` normalised to ``[0, 1]`` over the preprocessed (resized and
padded) image the ViT sees. The image processor maps boxes from the original frame; nothing here knows about it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cloc_encoder.configuration_cloc import CLOCConfig


class SinusoidalPointEncoder(nn.Module):
    """Points ``(..., 2)`` in ``[0, 1]`` → sinusoid features ``(..., 4·F)`` (sin and cos per coordinate).

    Frequencies are spaced geometrically from 1 to ``max_frequency`` cycles over the unit interval.
    """

    def __init__(self, num_frequencies: int, max_frequency: float) -> None:
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
        self.num_frequencies = num_frequencies
        self.max_frequency = max_frequency
        self.register_buffer("frequencies", self.compute_frequencies(), persistent=False)
        self.output_size = 4 * num_frequencies

    def compute_frequencies(self) -> torch.Tensor:
        """Angular frequencies ``(F,)``: ``2π · max_frequency^(k/(F-1))``."""
        count = self.num_frequencies
        exponents = torch.linspace(0.0, 1.0, count) if count > 1 else torch.zeros(1)
        return 2 * math.pi * (self.max_frequency**exponents)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points.unsqueeze(-1) * self.frequencies.to(points.dtype)  # (..., 2, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, 2F)
        return features.flatten(-2)


class PrompterLayer(nn.Module):
    """One pre-LayerNorm, single-head transformer encoder layer of width ``W``.

    ``forward`` is the plain layer over a full token sequence. ``forward_prompts`` computes only the outputs at the
    prompt positions of ``[prompts; image tokens]`` while the image tokens' keys and values are computed once per
    image (``image_key_values``) and shared by every prompt of that image; it equals the plain layer's prompt
    outputs within floating-point tolerance.
    """

    def __init__(self, width: int, mlp_ratio: float, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.width = width
        self.scale = width**-0.5
        self.norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain layer: ``(N, L, W)`` → ``(N, L, W)``."""
        normed = self.norm1(tokens)
        query = self.q_proj(normed).unsqueeze(1)
        key = self.k_proj(normed).unsqueeze(1)
        value = self.v_proj(normed).unsqueeze(1)
        attended = F.scaled_dot_product_attention(query, key, value).squeeze(1)
        hidden = tokens + self.out_proj(attended)
        return hidden + self.mlp(self.norm2(hidden))

    def image_key_values(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens ``(B, P, W)``, computed once per image."""
        normed = self.norm1(image_tokens)
        return self.k_proj(normed), self.v_proj(normed)

    def forward_prompts(
        self,
        prompts: torch.Tensor,
        image_keys: torch.Tensor,
        image_values: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Outputs at the prompt positions of ``[prompts; image tokens of image_index]``.

        Args:
            prompts: ``(R, T, W)`` prompt tokens, T per region (2 corners for a box, 1 for a text).
            image_keys, image_values: ``(B, P, W)`` from :meth:`image_key_values`.
            image_index: ``(R,)`` long, which image each region belongs to.
        Returns:
            ``(R, T, W)``.
        """
        num_regions, num_prompts, width = prompts.shape
        num_images, num_patches, _ = image_keys.shape
        normed = self.norm1(prompts)
        query = self.q_proj(normed) * self.scale
        prompt_keys = self.k_proj(normed)
        prompt_values = self.v_proj(normed)
        prompt_scores = query @ prompt_keys.transpose(1, 2)  # (R, T, T)

        # Lay the queries out per image (B, slots, T, W) so each image's keys are multiplied once, without copies.
        slot = _slot_within_image(image_index, num_images)
        slots = int(slot.max().item()) + 1 if num_regions else 1
        padded_query = query.new_zeros(num_images, slots, num_prompts, width)
        padded_query[image_index, slot] = query
        image_scores = padded_query.view(num_images, slots * num_prompts, width) @ image_keys.transpose(1, 2)
        image_scores = image_scores.view(num_images, slots, num_prompts, num_patches)[image_index, slot]  # (R,T,P)

        weights = torch.cat([prompt_scores, image_scores], dim=-1).softmax(dim=-1)
        prompt_weights, image_weights = weights.split([num_prompts, num_patches], dim=-1)
        padded_weights = image_weights.new_zeros(num_images, slots, num_prompts, num_patches)
        padded_weights[image_index, slot] = image_weights
        from_image = padded_weights.view(num_images, slots * num_prompts, num_patches) @ image_values
        from_image = from_image.view(num_images, slots, num_prompts, width)[image_index, slot]
        attended = prompt_weights @ prompt_values + from_image

        hidden = prompts + self.out_proj(attended)
        return hidden + self.mlp(self.norm2(hidden))


def _slot_within_image(image_index: torch.Tensor, num_images: int) -> torch.Tensor:
    """For each region, its rank among the regions of the same image (0, 1, ...), keeping input order."""
    if image_index.numel() == 0:
        return image_index
    one_hot = F.one_hot(image_index, num_images)  # (R, B)
    return (one_hot.cumsum(dim=0) - 1).gather(1, image_index[:, None]).squeeze(1)


class RegionPrompter(nn.Module):
    """Box and text prompts → pooled prompter output ``(R, W)`` → region embedding ``(R, D)``."""

    def __init__(self, config: CLOCConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.pool = config.prompter_pool
        self.point_encoder = SinusoidalPointEncoder(config.prompter_num_frequencies, config.prompter_max_frequency)
        self.corner_projection = nn.Linear(self.point_encoder.output_size, width)
        self.corner_embeddings = nn.Parameter(torch.zeros(2, width))  # which corner: top-left, bottom-right
        text_size = config.projection_dim if config.text_prompt_input == "embedding" else config.text_config.hidden_size
        self.text_projection = nn.Linear(text_size, width)
        self.layer = PrompterLayer(width, config.prompter_mlp_ratio, config.vision_config.layer_norm_eps)
        self.pool_norm = nn.LayerNorm(width) if config.prompter_pool_norm else nn.Identity()
        self.projection = nn.Linear(width, config.projection_dim, bias=False)

    def box_prompts(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(R, 4)`` model-frame ``xyxy`` boxes → ``(R, 2, W)`` corner tokens."""
        corners = boxes.view(-1, 2, 2)  # (R, corner, xy)
        return self.corner_projection(self.point_encoder(corners)) + self.corner_embeddings

    def text_prompts(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """``(R, D_text)`` text vectors → ``(R, 1, W)`` prompt tokens."""
        return self.text_projection(text_vectors).unsqueeze(1)

    def pooled(
        self,
        prompts: torch.Tensor,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        image_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the layer over ``[prompts; image tokens]`` and average-pool: ``(R, T, W)`` → ``(R, W)``.

        ``image_tokens`` is ``(B, P, W)``; ``image_key_values`` (from ``layer.image_key_values``) may be passed to
        reuse keys and values across calls when pooling over prompts only.
        """
        if self.pool == "prompts":
            keys, values = image_key_values or self.layer.image_key_values(image_tokens)
            outputs = self.layer.forward_prompts(prompts, keys, values, image_index)
        else:
            outputs = self.layer(torch.cat([prompts, image_tokens[image_index]], dim=1))
        return self.pool_norm(outputs.mean(dim=1))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled prompter output ``(R, W)`` → region embedding ``(R, D)`` (not normalised)."""
        return self.projection(pooled)


class BoxHead(nn.Module):
    """2-layer GELU MLP: ``(R, in)`` → ``(R, 4)`` model-frame ``xyxy`` in ``[0, 1]``.

    It predicts centre and size through a sigmoid, so every output is a valid box.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        center_size = self.mlp(features).sigmoid()
        center, size = center_size[:, :2], center_size[:, 2:]
        return torch.cat([center - size / 2, center + size / 2], dim=-1).clamp(0.0, 1.0)
