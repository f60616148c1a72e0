"""Region-text data for CLOC pretraining: a dataset and its collate function (samplers: :mod:`train.samplers`).

Per image and step the dataset yields the preprocessed image, its caption and up to ``M`` of its regions (boxes
mapped into the model frame by the same :class:`~cloc_encoder.image_processing.CLOCImageProcessor` transform as
the pixels). Everything random is a pure function of ``(seed, epoch, index)``, so a resumed run sees exactly the
samples the uninterrupted run would have seen.

Region text (a design decision): a region has a short ``caption`` (e.g. "red circle") and optionally referring
``expressions`` ("the red circle left of the square"). Each step uses **one** text per region, drawn uniformly
from ``[caption] + expressions`` with the ``(seed, epoch, index)`` generator, so over epochs a region is paired
with all its texts: the captions keep category-level alignment and the expressions teach the relational language
that referring-expression tasks need, without growing the region batch. Regions with no text are left out.

Unreadable images (missing, truncated, not an image, too large) never stop training: the record is skipped, the
next index (in data set order) is used in its place so every batch keeps its size (the contrastive losses gather
equal-sized batches across ranks), and the reason is reported in :attr:`CLOCBatch.skipped` for counting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from cloc_encoder.data.format import Region, RegionTextRecord
from cloc_encoder.data.images import IMAGE_ERRORS
from cloc_encoder.image_processing import CLOCImageProcessor
from train.samplers import SampleKey

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = (
    "pixel_values",
    "input_ids",
    "attention_mask",
    "region_boxes",
    "region_image_index",
    "region_input_ids",
    "region_attention_mask",
)


def _texts(region: Region) -> list[str]:
    return ([region.caption] if region.caption else []) + [e for e in region.expressions if e]


class RegionTextEncoder:
    """One record and its loaded image → a model-ready sample (shared by the map-style JSONL dataset and the
    streamed tar shards of :mod:`train.cloc.streaming`).

    Args:
        processor: maps images to ``(3, S, S)`` pixels and original-frame boxes to model-frame boxes.
        tokenizer: text tokenizer; every text is padded/truncated to ``max_length`` tokens.
        max_regions: M, regions sampled per image (0 disables regions).
    """

    def __init__(
        self, processor: CLOCImageProcessor, tokenizer: PreTrainedTokenizerBase, *, max_regions: int, max_length: int
    ) -> None:
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_regions = max_regions
        self.max_length = max_length

    def __call__(self, record: RegionTextRecord, image: Image.Image, rng: np.random.Generator) -> dict[str, Any]:
        """Pixels, caption tokens and up to M regions with one text each (drawn with ``rng``)."""
        regions = [region for region in record.regions if _texts(region)] if self.max_regions else []
        boxes = [region.box for region in regions]
        features = self.processor([image], boxes=[boxes])
        model_boxes = features["boxes"][0]
        usable = [i for i in range(len(regions)) if bool((model_boxes[i, 2:] > model_boxes[i, :2]).all())]
        chosen = sorted(rng.permutation(len(usable))[: self.max_regions].tolist()) if usable else []
        chosen = [usable[i] for i in chosen]
        region_texts = []
        for i in chosen:
            options = _texts(regions[i])
            region_texts.append(options[int(rng.integers(len(options)))])
        tokens = self.tokenizer(
            [record.caption, *region_texts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "id": record.id,
            "pixel_values": features["pixel_values"][0],
            "input_ids": tokens["input_ids"][0],
            "attention_mask": tokens["attention_mask"][0],
            "region_boxes": model_boxes[chosen].reshape(-1, 4),
            "region_input_ids": tokens["input_ids"][1:],
            "region_attention_mask": tokens["attention_mask"][1:],
            "region_texts": region_texts,
        }


class RegionTextDataset(Dataset):
    """Region-text records → model-ready samples.

    Args:
        records: the data set (e.g. from :func:`cloc_encoder.data.format.read_region_text`).
        processor: maps images to ``(3, S, S)`` pixels and original-frame boxes to model-frame boxes.
        tokenizer: text tokenizer; every text is padded/truncated to ``max_length`` tokens.
        max_regions: M, regions sampled per image (0 disables regions).
        seed: base seed of the per-sample generators.
    """

    def __init__(
        self,
        records: Sequence[RegionTextRecord],
        processor: CLOCImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_regions: int,
        max_length: int,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("the region-text data set is empty")
        self.records = list(records)
        self.encoder = RegionTextEncoder(processor, tokenizer, max_regions=max_regions, max_length=max_length)
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_regions = max_regions
        self.max_length = max_length
        self.seed = seed
        self._unreadable: dict[int, str] = {}  # per process: indices already found unreadable, with the reason

    def __len__(self) -> int:
        return len(self.records)

    def sample_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The generator of one sample's random choices (regions and their texts)."""
        return np.random.default_rng([self.seed, epoch, index])

    def load_image(self, index: int) -> Image.Image:
        """The record's image as RGB; raises :class:`OSError` (with the first failure's reason) when unreadable."""
        if index in self._unreadable:
            raise OSError(self._unreadable[index])
        try:
            with Image.open(self.records[index].image_path) as image:
                image.load()
                return image.convert("RGB")
        except IMAGE_ERRORS as error:
            reason = f"{type(error).__name__}: {error}"
            self._unreadable[index] = reason
            logger.warning("skipping unreadable image of record %s: %s", self.records[index].id, reason)
            raise OSError(reason) from error

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped: list[str] = []
        for attempt in range(len(self.records)):
            candidate = (index + attempt) % len(self.records)
            try:
                image = self.load_image(candidate)
            except IMAGE_ERRORS as error:
                record = self.records[candidate]
                skipped.append(f"{record.id} ({record.image_path}): {error}")
                continue
            sample = self.encode(self.records[candidate], image, self.sample_rng(epoch, candidate))
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(f"none of the {len(self.records)} images of the data set could be read: {skipped[:3]}")

    def encode(self, record: RegionTextRecord, image: Image.Image, rng: np.random.Generator) -> dict[str, Any]:
        """One record and its loaded image → pixels, caption tokens and up to M regions (:class:`RegionTextEncoder`)."""
        return self.encoder(record, image, rng)


@dataclass
class CLOCBatch:
    """A collated batch: ``inputs`` holds exactly the keyword arguments of ``CLOCModel.forward``."""

    inputs: dict[str, torch.Tensor]
    ids: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.inputs["pixel_values"].shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CLOCBatch:
        """Move tensors to ``device``; ``dtype`` (e.g. bf16 under DeepSpeed) applies to ``pixel_values`` only."""
        moved = {key: value.to(device) for key, value in self.inputs.items()}
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return CLOCBatch(inputs=moved, ids=self.ids, skipped=self.skipped)


def collate_cloc(samples: Sequence[dict[str, Any]]) -> CLOCBatch:
    """Stack samples of :class:`RegionTextDataset` into one :class:`CLOCBatch`.

    ``inputs``: ``pixel_values`` ``(N, 3, S, S)``, ``input_ids``/``attention_mask`` ``(N, L)``, ``region_boxes``
    ``(R, 4)`` model-frame ``xyxy``, ``region_image_index`` ``(R,)``, ``region_input_ids``/``region_attention_mask``
    ``(R, L)`` (``R`` may be 0).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    counts = torch.tensor([len(s["region_boxes"]) for s in samples])
    inputs = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "attention_mask": torch.stack([s["attention_mask"] for s in samples]),
        "region_boxes": torch.cat([s["region_boxes"] for s in samples]).float(),
        "region_image_index": torch.repeat_interleave(torch.arange(len(samples)), counts),
        "region_input_ids": torch.cat([s["region_input_ids"] for s in samples]),
        "region_attention_mask": torch.cat([s["region_attention_mask"] for s in samples]),
    }
    return CLOCBatch(
        inputs=inputs, ids=[s["id"] for s in samples], skipped=[m for s in samples for m in s.get("skipped", [])]
    )


__all__ = [
    "MODEL_INPUT_KEYS",
    "CLOCBatch",
    "RegionTextDataset",
    "RegionTextEncoder",
    "collate_cloc",
]
