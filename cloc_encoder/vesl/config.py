"""VESL settings: one dataclass whose defaults are the CLOC paper's (448-px detector input, confidence > 0.1,
at most 20 phrases, the ``<DT>?<JJ.*>*<NN.*>+`` grammar)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from cloc_encoder.vesl.phrases import MAX_PHRASES, NP_GRAMMAR, OWLV2_GENERIC_WORDS

DETECTOR_IMAGE_SIZE = 448
BOX_THRESHOLD = 0.1

RUNTIME_FIELDS = frozenset({"out", "batch_size", "device", "dtype", "progress", "max_shards"})
"""Fields that may change between a run and its resume (they do not choose what is computed)."""


class VESLConfigError(ValueError):
    """An invalid VESL setting; the message names the field."""


@dataclass
class VESLConfig:
    """Everything a VESL run needs.

    Inputs are either a folder of images (``images``, searched recursively) or region-text records
    (``records``: a JSONL file or folder of shards, see ``docs/data_format.md``) whose captions can be reused.
    """

    out: str
    detector: str
    """Local folder of an OWLv2 checkpoint (``Owlv2ForObjectDetection`` + its processor)."""
    images: str | None = None
    records: str | None = None
    webdataset: str | None = None
    """Local WebDataset tars of an img2dataset download (a folder of ``*.tar`` or a brace pattern): each sample's
    image (``{key}.jpg``...) with its caption (``{key}.txt``, else ``caption`` in ``{key}.json``); ids are
    ``<tar stem>/<key>``. Needs ``output_format="tar"`` (the images stay inside the tars)."""
    captioner: str | None = None
    """Local folder of a transformers image-to-text model; ``None`` uses the records' existing captions."""
    recaption: bool = True
    """With a captioner and records: re-caption every image (the paper); ``False`` captions only those without."""
    caption_prompt: str | None = None
    """Text prompt for captioners that take one (formatted as the model expects); ``None`` for plain captioners."""
    caption_max_new_tokens: int = 128
    caption_num_beams: int = 1
    detector_image_size: int = DETECTOR_IMAGE_SIZE
    box_threshold: float = BOX_THRESHOLD
    max_phrases: int = MAX_PHRASES
    grammar: str = NP_GRAMMAR
    ignore_words: tuple[str, ...] = field(default_factory=lambda: tuple(sorted(OWLV2_GENERIC_WORDS)))
    nms_iou: float | None = None
    """Optional non-maximum suppression of the kept boxes (the paper does not say; off by default)."""
    max_regions_per_image: int | None = None
    """Keep only the most confident boxes (``None``: all above the threshold)."""
    keep_images_without_regions: bool = True
    """Images with a caption but no box still serve the image-level CLIP loss."""
    absolute_image_paths: bool = False
    """Write absolute image paths instead of paths relative to ``out``."""
    output_format: Literal["jsonl", "tar", "both"] = "jsonl"
    """Shards as region-text JSONL (images stay where they are), as WebDataset tars holding the image bytes
    (``cloc_encoder.data.shards``, with ``sizes.json``), or both."""
    shard_size: int = 1000
    batch_size: int = 8
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    progress: bool = True
    max_shards: int | None = None
    """Stop after this many new shards (a run processes a slice; the next run resumes)."""

    def __post_init__(self) -> None:
        self.ignore_words = tuple(self.ignore_words)

    def validate(self) -> None:
        """Raise :class:`VESLConfigError` naming the first invalid field."""
        if sum(source is not None for source in (self.images, self.records, self.webdataset)) != 1:
            raise VESLConfigError(
                "give exactly one input: 'images' (a folder), 'records' (region-text JSONL) or 'webdataset' (tars)"
            )
        if self.output_format not in ("jsonl", "tar", "both"):
            raise VESLConfigError(f"'output_format' must be jsonl, tar or both, got {self.output_format!r}")
        if self.webdataset is not None and self.output_format != "tar":
            raise VESLConfigError("'webdataset' inputs are written as tar shards: set output_format='tar'")
        if not self.detector:
            raise VESLConfigError("'detector' (a local OWLv2 folder) is required")
        if self.images is not None and self.captioner is None:
            raise VESLConfigError("an image folder has no captions: give 'captioner' (a local image-to-text model)")
        if not 0.0 <= self.box_threshold < 1.0:
            raise VESLConfigError(f"'box_threshold' must be in [0, 1), got {self.box_threshold}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise VESLConfigError(f"'nms_iou' must be in (0, 1], got {self.nms_iou}")
        for name in ("shard_size", "batch_size", "max_phrases", "detector_image_size", "caption_max_new_tokens"):
            if getattr(self, name) < 1:
                raise VESLConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        if self.max_regions_per_image is not None and self.max_regions_per_image < 1:
            raise VESLConfigError(f"'max_regions_per_image' must be at least 1, got {self.max_regions_per_image}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise VESLConfigError(f"'dtype' must be float32, bfloat16 or float16, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ignore_words"] = list(self.ignore_words)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VESLConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VESLConfigError(f"unknown VESL setting(s): {', '.join(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Hash of the settings that decide the output (not ``RUNTIME_FIELDS``); a resume must match it."""
        data = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        for key, default in (("webdataset", None), ("output_format", "jsonl")):  # added later: old runs resume
            if data[key] == default:
                del data[key]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(choice: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; ``"cuda"`` without one is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise VESLConfigError("device 'cuda' was asked for but no GPU is visible (use device=auto or cpu)")
    return choice


__all__ = ["BOX_THRESHOLD", "DETECTOR_IMAGE_SIZE", "VESLConfig", "VESLConfigError", "resolve_device"]
