"""The CLOC prompter: turns a box (or a text) into a region embedding over one ViT pass's patch tokens.

Paper: each box corner is a sinusoidal encoding of its normalised coordinates mapped to ViT width; the prompt
tokens are prepended to the pre-norm patch tokens ``f_I'(x)`` and go through one single-head transformer encoder
layer of ViT width; a global average pool and a linear projection give the region embedding. A text prompt (the
region caption's embedding mapped to ViT width) goes through the same layer and feeds the box head.

Coordinates here are in the **model frame**: ``xyxy`` normalised to ``[0, 1]`` over the preprocessed (resized and
padded) image the ViT sees. The image processor maps boxes from the original frame; nothing here knows about it.

Geometry stays in fp32 whatever the model's dtype: box coordinates, point encodings (whose top frequency turns a
coordinate step of 1/256, bf16's resolution near 1, into 1.6 rad), patch centres, the box attention bias and the
attention geometry read by the box head are computed in fp32; only their results are cast to the weights' dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cloc_encoder.configuration_cloc import CLOCConfig


class SinusoidalPointEncoder(nn.Module):
    """Points ``(..., 2)`` in ``[0, 1]`` → fp32 sinusoid features ``(..., 4·F)`` (sin and cos per coordinate).

    Frequencies are spaced geometrically from 1 to ``max_frequency`` cycles over the unit interval. They are not a
    buffer (``model.to(torch.bfloat16)`` would round 2π·64 to a step of 2 rad) and the angles are computed in fp32
    whatever the input's dtype; callers cast the features to their weights' dtype.
    """

    def __init__(self, num_frequencies: int, max_frequency: float) -> None:
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
        self.num_frequencies = num_frequencies
        self.max_frequency = max_frequency
        self.output_size = 4 * num_frequencies

    def compute_frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 angular frequencies ``(F,)``: ``2π · max_frequency^(k/(F-1))``."""
        count = self.num_frequencies
        exponents = torch.linspace(0.0, 1.0, count, device=device) if count > 1 else torch.zeros(1, device=device)
        return 2 * math.pi * (self.max_frequency**exponents)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points.float().unsqueeze(-1) * self.compute_frequencies(points.device)  # (..., 2, F) fp32
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, 2F)
        return features.flatten(-2)


class PrompterLayer(nn.Module):
    """One pre-LayerNorm, single-head transformer encoder layer of width ``W``.

    ``forward`` is the plain layer over a full token sequence. ``forward_prompts`` computes only the outputs at the
    prompt positions of ``[prompts; image tokens]`` while the image tokens' keys and values are computed once per
    image (``image_key_values``) and shared by every prompt of that image; it equals the plain layer's prompt
    outputs within floating-point tolerance.
    """

    def __init__(
        self,
        width: int,
        mlp_ratio: float,
        layer_norm_eps: float = 1e-5,
        key_position_encoder: SinusoidalPointEncoder | None = None,
    ) -> None:
        super().__init__()
        self.width = width
        # Optional: the patch centres' sinusoidal encoding (the corner tokens' encoder), mapped to width and
        # normalised, is added to the image tokens' key inputs so box corners can match patch positions.
        self.key_position_encoder = key_position_encoder
        self.key_position_projection = (
            nn.Linear(key_position_encoder.output_size, width) if key_position_encoder is not None else None
        )
        self.scale = width**-0.5
        self.norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def key_positions(self, num_tokens: int) -> torch.Tensor | None:
        """Additive key inputs ``(num_tokens, W)``, or ``None`` when the layer has no key positions.

        The image's patch grid is taken to be the last ``s²`` tokens, ``s = isqrt(num_tokens)`` (row-major, as the
        ViT lays them out); the tokens before it (prompts, a CLS token) get zeros. This holds whenever fewer than
        ``2s + 1`` tokens precede the grid, so the plain layer over ``[prompts; CLS; patches]`` and the fast path
        over ``[CLS; patches]`` place the positions identically.
        """
        if self.key_position_encoder is None:
            return None
        side = math.isqrt(num_tokens)
        weight = self.key_position_projection.weight
        centres = (torch.arange(side, device=weight.device, dtype=torch.float32) + 0.5) / side
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        points = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        encoded = self.key_position_encoder(points).to(weight.dtype)
        positions = self.norm1(self.key_position_projection(encoded))
        return F.pad(positions, (0, 0, num_tokens - side * side, 0))

    def forward(
        self, tokens: torch.Tensor, num_prompts: int = 0, image_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plain layer: ``(N, L, W)`` → ``(N, L, W)``. The first ``num_prompts`` tokens are prompts; ``image_bias``
        ``(N, L - num_prompts)``, when given, is added to every query's attention logits for the other tokens."""
        normed = self.norm1(tokens)
        positions = self.key_positions(tokens.shape[1])
        key_input = normed if positions is None else normed + positions.to(normed.dtype)
        query = self.q_proj(normed).unsqueeze(1)
        key = self.k_proj(key_input).unsqueeze(1)
        value = self.v_proj(normed).unsqueeze(1)
        mask = None
        if image_bias is not None:
            mask = F.pad(image_bias, (num_prompts, 0)).to(query.dtype)[:, None, None, :]  # (N, 1, 1, L)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask).squeeze(1)
        hidden = tokens + self.out_proj(attended)
        return hidden + self.mlp(self.norm2(hidden))

    def image_key_values(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens ``(B, P, W)``, computed once per image."""
        normed = self.norm1(image_tokens)
        positions = self.key_positions(image_tokens.shape[1])
        key_input = normed if positions is None else normed + positions.to(normed.dtype)
        return self.k_proj(key_input), self.v_proj(normed)

    def prompt_image_attention(
        self, prompts: torch.Tensor, image_keys: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """fp32 attention of each prompt over its image's tokens ``(R, T, P)``, renormalised over the image tokens.

        The same logits as the layer computes (both pooling modes share the image keys), so this is exactly how
        the layer distributes a prompt's image attention. Used to read where a text prompt looks.
        """
        query = self.q_proj(self.norm1(prompts)) * self.scale
        return (query @ image_keys[image_index].transpose(1, 2)).float().softmax(dim=-1)

    def forward_prompts(
        self,
        prompts: torch.Tensor,
        image_keys: torch.Tensor,
        image_values: torch.Tensor,
        image_index: torch.Tensor,
        image_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Outputs at the prompt positions of ``[prompts; image tokens of image_index]``.

        Args:
            prompts: ``(R, T, W)`` prompt tokens, T per region (2 corners for a box, 1 for a text).
            image_keys, image_values: ``(B, P, W)`` from :meth:`image_key_values`.
            image_index: ``(R,)`` long, which image each region belongs to.
            image_bias: optional ``(R, P)`` added to the region's attention logits for the image tokens.
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
        if image_bias is not None:
            image_scores = image_scores + image_bias[:, None, :].to(image_scores.dtype)

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


def patch_centres(num_tokens: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """fp32 model-frame centres ``(G, 2)`` (x, y; row-major like the ViT) of a square patch grid of ``num_tokens``
    image tokens, and whether a CLS token precedes the grid (``num_tokens = 1 + G``)."""
    side = math.isqrt(num_tokens)
    has_cls = side * side != num_tokens
    if has_cls:
        side = math.isqrt(num_tokens - 1)
        if side * side != num_tokens - 1:
            raise ValueError(f"{num_tokens} image tokens are neither a square patch grid nor CLS + one")
    centres = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1), has_cls


class RegionPrompter(nn.Module):
    """Box and text prompts → pooled prompter output ``(R, W)`` → region embedding ``(R, D)``."""

    def __init__(self, config: CLOCConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.pool = config.prompter_pool
        self.box_attention_bias_value = float(config.prompter_box_attention_bias)
        self.point_encoder = SinusoidalPointEncoder(config.prompter_num_frequencies, config.prompter_max_frequency)
        self.corner_projection = nn.Linear(self.point_encoder.output_size, width)
        self.corner_embeddings = nn.Parameter(torch.zeros(2, width))  # which corner: top-left, bottom-right
        text_size = config.projection_dim if config.text_prompt_input == "embedding" else config.text_config.hidden_size
        self.text_projection = nn.Linear(text_size, width)
        key_position_encoder = None
        if config.prompter_key_positions == "sinusoidal":
            key_position_encoder = SinusoidalPointEncoder(
                config.prompter_num_frequencies, config.prompter_max_frequency
            )
        self.layer = PrompterLayer(
            width, config.prompter_mlp_ratio, config.vision_config.layer_norm_eps, key_position_encoder
        )
        self.pool_norm = nn.LayerNorm(width) if config.prompter_pool_norm else nn.Identity()
        self.projection = nn.Linear(width, config.projection_dim, bias=False)

    def box_prompts(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(R, 4)`` model-frame ``xyxy`` boxes (any float dtype; fp32 keeps their precision) → ``(R, 2, W)`` corner
        tokens in the weights' dtype."""
        corners = boxes.reshape(-1, 2, 2)  # (R, corner, xy)
        encoded = self.point_encoder(corners).to(self.corner_projection.weight.dtype)
        return self.corner_projection(encoded) + self.corner_embeddings

    def text_prompts(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """``(R, D_text)`` text vectors → ``(R, 1, W)`` prompt tokens."""
        return self.text_projection(text_vectors).unsqueeze(1)

    def text_features(
        self,
        text_vectors: torch.Tensor,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        image_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text prompts → pooled outputs ``(R, W)`` and the fp32 geometry of their image attention ``(R, 4)``.

        The geometry is ``4·(mean − 0.5)`` and ``4·spread`` of the patch centres (model frame, x then y) under the
        prompt's attention over the patch tokens (CLS excluded): where the text looks and how widely.
        """
        prompts = self.text_prompts(text_vectors.to(image_tokens.dtype))
        keys, values = image_key_values or self.layer.image_key_values(image_tokens)
        pooled = self.pooled(prompts, image_tokens, image_index, (keys, values))
        weights = self.layer.prompt_image_attention(prompts, keys, image_index)[:, 0]  # (R, P)
        centres, has_cls = patch_centres(image_tokens.shape[1], weights.device)
        if has_cls:
            weights = weights[:, 1:] / weights[:, 1:].sum(dim=-1, keepdim=True).clamp_min(1e-12)
        mean = weights @ centres  # (R, 2)
        variance = (weights.unsqueeze(-1) * (centres.unsqueeze(0) - mean.unsqueeze(1)).square()).sum(dim=1)
        geometry = torch.cat([4 * (mean - 0.5), 4 * variance.clamp_min(1e-8).sqrt()], dim=-1)
        return pooled, geometry

    def box_attention_bias(self, boxes: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
        """fp32 ``(R, P)``: ``prompter_box_attention_bias`` for image tokens whose patch centre lies inside the box, 0
        elsewhere (and for a CLS token); ``None`` when the bias is 0. Boxes are model-frame ``xyxy`` ``(R, 4)``,
        compared with the patch centres in fp32 (a rounded thin box would flip which centres it holds)."""
        if not self.box_attention_bias_value:
            return None
        points, has_cls = patch_centres(num_tokens, boxes.device)
        x, y = points[:, 0], points[:, 1]
        x1, y1, x2, y2 = (boxes[:, i : i + 1].float() for i in range(4))
        inside = (x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)
        bias = inside.float() * self.box_attention_bias_value
        return F.pad(bias, (1, 0)) if has_cls else bias

    def box_features(
        self,
        boxes: torch.Tensor,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        image_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-frame boxes ``(R, 4)`` → pooled outputs ``(R, W)`` and region embeddings ``(R, D)`` in the image
        tokens' dtype. Pass boxes in fp32: they are used at the precision they come in (never rounded here)."""
        prompts = self.box_prompts(boxes)
        bias = self.box_attention_bias(boxes, image_tokens.shape[1])
        pooled = self.pooled(prompts, image_tokens, image_index, image_key_values, image_bias=bias)
        return pooled, self.embed(pooled)

    def pooled(
        self,
        prompts: torch.Tensor,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor,
        image_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the layer over ``[prompts; image tokens]`` and average-pool: ``(R, T, W)`` → ``(R, W)``.

        ``image_tokens`` is ``(B, P, W)``; ``image_key_values`` (from ``layer.image_key_values``) may be passed to
        reuse keys and values across calls when pooling over prompts only.
        """
        if self.pool == "prompts":
            keys, values = image_key_values or self.layer.image_key_values(image_tokens)
            outputs = self.layer.forward_prompts(prompts, keys, values, image_index, image_bias)
        else:
            tokens = torch.cat([prompts, image_tokens[image_index]], dim=1)
            outputs = self.layer(tokens, num_prompts=prompts.shape[1], image_bias=image_bias)
        return self.pool_norm(outputs.mean(dim=1))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled prompter output ``(R, W)`` → region embedding ``(R, D)`` (not normalised)."""
        return self.projection(pooled)


class BoxHead(nn.Module):
    """2-layer GELU MLP: ``(R, in)`` → fp32 ``(R, 4)`` model-frame ``xyxy`` in ``[0, 1]``.

    It predicts centre and size through a sigmoid, so every output is a valid box. The inputs are cast to the
    weights' dtype; the sigmoid and the corner arithmetic run in fp32.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        center_size = self.mlp(features.to(weight.dtype)).float().sigmoid()
        center, size = center_size[:, :2], center_size[:, 2:]
        return torch.cat([center - size / 2, center + size / 2], dim=-1).clamp(0.0, 1.0)
