"""Zero-shot evaluation of a CLOC encoder alone, following the CLOC paper's protocol.

- **Region classification** on COCO / LVIS instance files: every ground-truth box's region embedding (one ViT pass
  per image, all of its boxes through the prompter at once) takes the most similar class text among **all** the
  file's categories. Class texts are the raw category names by default (``"{}"``; the paper's setting), or any
  template(s). Score: mean class accuracy (mAcc, the paper's number) and plain accuracy.
- **Image classification** on an ImageNet-style folder (one subfolder per class): each image's global embedding
  takes the most similar class text (``"a photo of a {}."`` by default, or an ensemble of templates whose
  normalised text embeddings are averaged, as CLIP does). Scores: top-1, top-5, mean class accuracy.

Images that are missing or unreadable are skipped, counted and listed (first 20), never fatal.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cloc_encoder.data.converters.coco import (
    INSTANCES_WHAT,
    LVIS_WHAT,
    category_names,
    convert_coco_data,
    lvis_as_coco,
)
from cloc_encoder.data.converters.common import ConversionReport, load_json
from cloc_encoder.data.format import RegionTextRecord
from cloc_encoder.data.images import IMAGE_ERRORS
from cloc_encoder.image_processing import CLOCImageProcessor, FrameTransform
from cloc_encoder.modeling_cloc import CLOCModel
from eval.encoder.evaluate import encode_texts
from eval.encoder.metrics import region_classification, topk_accuracy

logger = logging.getLogger(__name__)

REGION_TEMPLATES = ("{}",)
"""Region classification prompts: the raw class name, as in the CLOC paper."""
IMAGE_TEMPLATES = ("a photo of a {}.",)
"""Image classification prompt (CLIP's single template)."""
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""CLIP's 7-template ImageNet subset (its notebook's best ensemble); averaged text embeddings."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_SKIPPED_EXAMPLES = 20
_WNID = re.compile(r"^n\d{8}$")


# ----- class texts --------------------------------------------------------------------------------------------------


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple; each must hold one ``{}`` for the class name."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"a prompt template needs exactly one '{{}}' for the class name, got {template!r}")
    return tuple(templates)


def class_text_embeddings(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    class_names: Sequence[str],
    templates: Sequence[str] = REGION_TEMPLATES,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``(C, D)`` unit-norm class embeddings: each class's templates encoded, normalised, averaged, renormalised."""
    templates = check_templates(templates)
    texts = [template.format(name) for name in class_names for template in templates]
    embeds, _ = encode_texts(model, tokenizer, texts, batch_size, progress)
    embeds = F.normalize(embeds, dim=-1).view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeds, dim=-1)


# ----- images -------------------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    index: int
    pixels: torch.Tensor | None
    transform: FrameTransform | None
    error: str | None = None


class _ImageFiles(Dataset):
    """Opens and preprocesses image files; a missing or unreadable file becomes an error, not a raise."""

    def __init__(self, paths: Sequence[Path], processor: CLOCImageProcessor) -> None:
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Loaded:
        try:
            with Image.open(self.paths[index]) as image:
                image.load()
                pixels, transform = self.processor.to_model_pixels(image)
        except IMAGE_ERRORS as error:
            return _Loaded(index, None, None, f"{type(error).__name__}: {error}")
        return _Loaded(index, pixels, transform)


def _as_list(batch: list[_Loaded]) -> list[_Loaded]:
    return batch


def _image_batches(
    paths: Sequence[Path],
    processor: CLOCImageProcessor,
    batch_size: int,
    num_workers: int,
    progress: bool,
    skipped: list[dict[str, str]],
):
    """Yield lists of readable :class:`_Loaded` images; unreadable ones are logged and appended to ``skipped``."""
    loader = DataLoader(
        _ImageFiles(paths, processor), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
        for item in batch:
            if item.error is not None:
                logger.warning("skipping image %s: %s", paths[item.index], item.error)
                skipped.append({"image": str(paths[item.index]), "error": item.error})
        loaded = [item for item in batch if item.error is None]
        if loaded:
            yield loaded


def _settings(model: CLOCModel, processor: CLOCImageProcessor, templates: Sequence[str], batch_size: int) -> dict:
    return {
        "templates": list(templates),
        "batch_size": batch_size,
        "image_size": processor.image_size,
        "resize_mode": processor.resize_mode,
        "prompter_pool": model.config.prompter_pool,
    }


def _in_eval_mode(function):
    """Run ``function(model, ...)`` under inference mode with the model in eval mode, restoring its mode after."""

    @functools.wraps(function)
    def wrapper(model: CLOCModel, *args: Any, **kwargs: Any) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return function(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapper


# ----- region classification on COCO / LVIS ----------------------------------------------------------------------


@dataclass
class InstanceSet:
    """Records (one per image with boxes) and the candidate class names of a COCO or LVIS instance file."""

    class_names: list[str]
    records: list[RegionTextRecord]
    report: ConversionReport


def load_instance_set(
    path: str | os.PathLike[str], images_dir: str | os.PathLike[str], kind: str = "coco", include_crowd: bool = False
) -> InstanceSet:
    """Read ``instances_<split>.json`` (``kind="coco"``) or ``lvis_v1_<split>.json`` (``kind="lvis"``) with the
    project's converters. The classes are every category of the file (in id order), whether or not it has a box;
    LVIS names have underscores replaced by spaces. Images are ``images_dir/file_name`` (LVIS: ``images_dir`` is
    the COCO root, files are ``<split folder>/<file>``). Crowd boxes are left out unless ``include_crowd``."""
    if kind not in ("coco", "lvis"):
        raise ValueError(f"kind={kind!r}; expected 'coco' or 'lvis'")
    data = load_json(path, LVIS_WHAT if kind == "lvis" else INSTANCES_WHAT)
    if kind == "lvis":
        data = lvis_as_coco(data, str(path))
    categories = category_names(data, str(path))
    names = list(dict.fromkeys(categories[key] for key in sorted(categories)))
    records, report = convert_coco_data(
        data, where=str(path), source=kind, images_dir=images_dir, include_crowd=include_crowd, max_examples=5
    )
    return InstanceSet(names, records, report)


@_in_eval_mode
def evaluate_region_zeroshot(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[RegionTextRecord],
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = REGION_TEMPLATES,
    processor: CLOCImageProcessor | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify every ground-truth box of ``records`` among ``class_names`` (boxes whose category is not one of
    them are left out and counted as ``num_unknown_category``).

    Returns a JSON-ready dict: ``num_images``, ``num_skipped_images``, ``skipped_images``, ``num_regions``,
    ``num_candidate_classes``, ``region_classification`` (:func:`~eval.encoder.metrics.region_classification`:
    ``accuracy``, ``mean_class_accuracy``, ``per_class``...) and ``settings``.
    """
    parameter = next(model.parameters())
    processor = processor or CLOCImageProcessor.for_model(model.config)
    class_of = {name: index for index, name in enumerate(class_names)}
    classes = class_text_embeddings(model, tokenizer, class_names, templates, progress=progress)
    embeds, labels, skipped = [], [], []
    unknown = num_images = 0
    paths = [record.image_path for record in records]
    for loaded in _image_batches(paths, processor, batch_size, num_workers, progress, skipped):
        num_images += len(loaded)
        pixel_values = torch.stack([item.pixels for item in loaded]).to(parameter.device, parameter.dtype)
        state = model.encode_images(pixel_values)
        boxes, image_index = [], []
        for slot, item in enumerate(loaded):
            regions = [r for r in records[item.index].regions if r.category in class_of]
            unknown += len(records[item.index].regions) - len(regions)
            if regions:
                boxes.append(item.transform.boxes_to_model([r.box for r in regions]))
                image_index += [slot] * len(regions)
                labels += [class_of[r.category] for r in regions]
        if boxes:
            index = torch.tensor(image_index, device=parameter.device)
            batch = model.region_embeddings(state, torch.cat(boxes).to(parameter.device), index)  # boxes stay fp32
            embeds.append(F.normalize(batch.float(), dim=-1).cpu())
    regions = torch.cat(embeds) if embeds else torch.zeros(0, classes.shape[1])
    result = region_classification(regions, classes, torch.tensor(labels, dtype=torch.long), list(class_names))
    return {
        "num_images": num_images,
        "num_skipped_images": len(skipped),
        "skipped_images": skipped[:MAX_SKIPPED_EXAMPLES],
        "num_regions": len(labels),
        "num_unknown_category": unknown,
        "num_candidate_classes": len(class_names),
        "region_classification": result,
        "settings": _settings(model, processor, templates, batch_size),
    }


# ----- image classification on a class-per-folder tree ----------------------------------------------------------


@dataclass
class ImageFolderSet:
    """Images and labels of a class-per-folder tree; ``folders[i]`` holds the images of ``class_names[i]``."""

    folders: list[str]
    class_names: list[str]
    paths: list[Path]
    labels: list[int]


def _read_classnames(path: Path, folders: Sequence[str]) -> dict[str, str]:
    """``{folder: class name}`` from a ``.json`` mapping / list or a ``.txt`` file (see :func:`load_image_folder`)."""
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            entries = [str(item) for item in data]
        elif isinstance(data, dict):
            keras = all(k.isdigit() and isinstance(v, list) and len(v) == 2 for k, v in data.items())
            if data and keras:  # imagenet_class_index.json: {"0": ["n01440764", "tench"]}
                return {str(v[0]): str(v[1]) for v in data.values()}
            return {str(k): str(v[0] if isinstance(v, list) else v) for k, v in data.items()}
        else:
            raise ValueError(f"{path}: expected a JSON object {{folder: name}} or a list of names")
    else:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [line.split(maxsplit=1) for line in lines]
        if pairs and all(len(pair) == 2 and pair[0] in folders for pair in pairs):  # "n01440764 tench"
            return {pair[0]: pair[1] for pair in pairs}
        entries = lines
    if len(entries) != len(folders):
        raise ValueError(f"{path}: {len(entries)} class names for {len(folders)} class folders (sorted order)")
    return dict(zip(folders, entries, strict=True))


def load_image_folder(
    root: str | os.PathLike[str], classnames: str | os.PathLike[str] | None = None, limit: int | None = None
) -> ImageFolderSet:
    """Scan ``root/<class folder>/**/<image>`` (files with an image extension; folders in sorted order).

    Class names are the folder names with underscores as spaces, or come from ``classnames``: a JSON object
    ``{folder: name}`` (or ``{folder: [name, ...]}``, or Keras' ``{"0": [wnid, name]}``), a JSON list, a ``.txt``
    with ``<folder> <name>`` lines, or a ``.txt`` with one name per line in sorted-folder order. WordNet-id folders
    (``n01440764``) need ``classnames``. ``limit`` keeps the first N images (in folder order).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected one subfolder per class)")
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class subfolders")
    if classnames is not None:
        mapping = _read_classnames(Path(classnames), folders)
        missing = [folder for folder in folders if folder not in mapping]
        if missing:
            raise ValueError(f"{classnames}: no class name for folder(s) {missing[:5]}")
        names = [mapping[folder] for folder in folders]
    elif any(_WNID.match(folder) for folder in folders):
        raise ValueError(f"{root}: folders look like WordNet ids ({folders[0]}); pass --classnames with their names")
    else:
        names = [" ".join(folder.replace("_", " ").split()) for folder in folders]
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += files
        labels += [label] * len(files)
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    return ImageFolderSet(folders, names, paths, labels)


@_in_eval_mode
def evaluate_image_zeroshot(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: ImageFolderSet,
    *,
    templates: Sequence[str] = IMAGE_TEMPLATES,
    processor: CLOCImageProcessor | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5),
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot classification of each image of ``dataset`` among all its classes.

    Returns a JSON-ready dict: ``num_images``, ``num_skipped_images``, ``skipped_images``, ``num_classes``,
    ``classification`` (``top1``, ``top5``, ``mean_class_accuracy``, ``per_class``) and ``settings``.
    """
    parameter = next(model.parameters())
    processor = processor or CLOCImageProcessor.for_model(model.config)
    classes = class_text_embeddings(model, tokenizer, dataset.class_names, templates, progress=progress)
    embeds, labels, skipped = [], [], []
    for loaded in _image_batches(dataset.paths, processor, batch_size, num_workers, progress, skipped):
        pixel_values = torch.stack([item.pixels for item in loaded]).to(parameter.device, parameter.dtype)
        embeds.append(F.normalize(model.encode_images(pixel_values).image_embeds.float(), dim=-1).cpu())
        labels += [dataset.labels[item.index] for item in loaded]
    images = torch.cat(embeds) if embeds else torch.zeros(0, classes.shape[1])
    targets = torch.tensor(labels, dtype=torch.long)
    top = topk_accuracy(images, classes, targets, ks)
    per_class = region_classification(images, classes, targets, dataset.class_names)
    classification = {
        **{key: value for key, value in top.items() if key != "num_queries"},
        "mean_class_accuracy": per_class["mean_class_accuracy"],
        "num_images": len(labels),
        "num_classes_with_images": per_class["num_classes"],
        "per_class": per_class["per_class"],
    }
    return {
        "num_images": len(labels),
        "num_skipped_images": len(skipped),
        "skipped_images": skipped[:MAX_SKIPPED_EXAMPLES],
        "num_classes": len(dataset.class_names),
        "classification": classification,
        "settings": {**_settings(model, processor, templates, batch_size), "ks": list(ks)},
    }


__all__ = [
    "ENSEMBLE_TEMPLATES",
    "IMAGE_TEMPLATES",
    "REGION_TEMPLATES",
    "ImageFolderSet",
    "InstanceSet",
    "check_templates",
    "class_text_embeddings",
    "evaluate_image_zeroshot",
    "evaluate_region_zeroshot",
    "load_image_folder",
    "load_instance_set",
]
