"""Evaluate a CLOC encoder on region-text records: region classification, retrieval and text → box grounding.

Works on any region-text split (the synthetic world, converted COCO / LVIS / RefCOCO / Visual Genome): it reads
only boxes, categories, region captions/expressions and image captions. Boxes in the records are ``xyxy``
normalised by the **original** image size; the image processor's :class:`FrameTransform` maps them into the model
frame for the prompter and maps predicted boxes back, so grounding is scored in the original frame.

Cost: the text tower runs once per distinct string, the ViT once per image, and the prompter once per
(region) and per (region, text) pair, batched per image batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from cloc_encoder.data.format import Region, RegionTextRecord
from cloc_encoder.data.images import IMAGE_ERRORS
from cloc_encoder.image_processing import CLOCImageProcessor, FrameTransform
from cloc_encoder.modeling_cloc import CLOCImageState, CLOCModel
from eval.encoder.metrics import box_grounding, region_classification, retrieval_recall

logger = logging.getLogger(__name__)

DEFAULT_CLASS_PROMPT = "{}"
"""Class-name template for region classification; ``"{}"`` is the bare category name (how converted COCO/LVIS
region captions are written). CLIP's ``"a photo of a {}."`` is the usual choice for web-trained encoders."""
RETRIEVAL_KS = (1, 10)
MAX_SKIPPED_EXAMPLES = 20


def region_texts(region: Region) -> list[str]:
    """The distinct non-empty texts of a region: its caption, then its referring expressions, in order."""
    texts = [region.caption, *region.expressions]
    return list(dict.fromkeys(text.strip() for text in texts if text and text.strip()))


@dataclass
class _Strings:
    """Distinct strings in first-seen order: ``index(text)`` → position in :attr:`texts`."""

    texts: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)

    def index(self, text: str) -> int:
        if text not in self.positions:
            self.positions[text] = len(self.texts)
            self.texts.append(text)
        return self.positions[text]


@dataclass
class _LoadedImage:
    record_index: int
    pixels: torch.Tensor | None
    transform: FrameTransform | None
    error: str | None = None


class _ImageDataset(Dataset):
    """Opens and preprocesses each record's image; a missing or unreadable file becomes an error, not a raise."""

    def __init__(self, records: Sequence[RegionTextRecord], processor: CLOCImageProcessor) -> None:
        self.records = records
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> _LoadedImage:
        path = self.records[index].image_path
        try:
            with Image.open(path) as image:
                image.load()
                pixels, transform = self.processor.to_model_pixels(image)
        except IMAGE_ERRORS as error:
            return _LoadedImage(index, None, None, f"{type(error).__name__}: {error}")
        return _LoadedImage(index, pixels, transform)


def _as_list(batch: list[_LoadedImage]) -> list[_LoadedImage]:
    return batch


def encode_texts(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings ``(N, D)`` and prompter text vectors ``(N, ·)`` (on CPU, float32, not normalised).

    The text vectors are what :meth:`CLOCModel.predict_boxes` takes: the embeddings, or the text tower's pooled
    outputs when ``config.text_prompt_input == "pooled"``. Texts are padded to the text tower's full length
    (SigLIP pools the last position, so padding must match its training).
    """
    parameter = next(model.parameters())
    max_length = model.config.text_config.max_position_embeddings
    use_pooled = model.config.text_prompt_input == "pooled"
    embeds, vectors = [], []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="texts", unit="batch", disable=not progress):
        tokens = tokenizer(
            list(texts[start : start + batch_size]),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.get("attention_mask")
        output = model.encode_text(
            tokens["input_ids"].to(parameter.device), None if mask is None else mask.to(parameter.device)
        )
        embeds.append(output.text_embeds.float().cpu())
        vectors.append((output.pooled if use_pooled else output.text_embeds).float().cpu())
    if not embeds:
        size = model.config.projection_dim
        return torch.zeros(0, size), torch.zeros(0, size)
    return torch.cat(embeds), torch.cat(vectors)


def _positives(query_keys: Sequence[Sequence[int]], gallery_keys: Sequence[Sequence[int]]) -> list[list[int]]:
    """Gallery items sharing at least one key (a string index) with each query."""
    holders: dict[int, list[int]] = {}
    for item, keys in enumerate(gallery_keys):
        for key in keys:
            holders.setdefault(key, []).append(item)
    return [sorted({item for key in keys for item in holders.get(key, [])}) for keys in query_keys]


def _two_way_retrieval(
    items: torch.Tensor,
    item_texts: Sequence[Sequence[int]],
    text_embeds: torch.Tensor,
    item_name: str,
) -> dict[str, Any] | None:
    """``item → text`` and ``text → item`` recall over the distinct texts the items carry."""
    used = sorted({key for keys in item_texts for key in keys})
    if not used:
        return None
    column = {key: position for position, key in enumerate(used)}
    gallery_texts = text_embeds[used]
    item_columns = [[column[key] for key in keys] for keys in item_texts]
    text_items = _positives([[c] for c in range(len(used))], item_columns)
    return {
        f"{item_name}_to_text": retrieval_recall(items, gallery_texts, item_columns, RETRIEVAL_KS),
        f"text_to_{item_name}": retrieval_recall(gallery_texts, items, text_items, RETRIEVAL_KS),
        f"num_{item_name}s": int(items.shape[0]),
        "num_texts": len(used),
    }


@dataclass
class _BatchRegions:
    """One image batch's prompter results: region embeddings ``(R, D)`` with (category, text keys) per region,
    and predicted / ground-truth boxes ``(pairs, 4)`` in the original frame, one per (region, text) pair."""

    embeds: torch.Tensor
    info: list[tuple[str | None, list[int]]]
    predicted: torch.Tensor
    targets: torch.Tensor


def _prompt_batch(
    model: CLOCModel,
    state: CLOCImageState,
    loaded: Sequence[_LoadedImage],
    records: Sequence[RegionTextRecord],
    region_keys: Sequence[Sequence[list[int]]],
    text_vectors: torch.Tensor,
) -> _BatchRegions | None:
    """Region embeddings for every ground-truth box and text → box for every (region, text) pair of a batch."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    boxes, box_image, pair_key, pair_image, info, targets = [], [], [], [], [], []
    for slot, item in enumerate(loaded):
        record = records[item.record_index]
        if not record.regions:
            continue
        original = torch.tensor([region.box for region in record.regions], dtype=torch.float32)
        boxes.append(item.transform.boxes_to_model(original))
        box_image.extend([slot] * len(record.regions))
        for region, box, keys in zip(record.regions, original, region_keys[item.record_index], strict=True):
            info.append((region.category, keys))
            pair_key.extend(keys)
            pair_image.extend([slot] * len(keys))
            targets.extend(box[None] for _ in keys)
    if not boxes:
        return None
    image_index = torch.tensor(box_image, device=device)
    embeds = model.region_embeddings(state, torch.cat(boxes).to(device, dtype), image_index).float().cpu()
    predicted = []
    if pair_key:
        pair_slots = torch.tensor(pair_image)
        vectors = text_vectors[pair_key].to(device, dtype)
        model_boxes = model.predict_boxes(state, vectors, pair_slots.to(device)).float().cpu()
        # Pairs are grouped by image slot, in order: map each group back with its own image's transform.
        for slot, item in enumerate(loaded):
            chosen = pair_slots == slot
            if bool(chosen.any()):
                predicted.append(item.transform.boxes_to_original(model_boxes[chosen]))
    empty = torch.zeros(0, 4)
    return _BatchRegions(
        embeds=embeds,
        info=info,
        predicted=torch.cat(predicted) if predicted else empty,
        targets=torch.cat(targets) if targets else empty,
    )


@torch.inference_mode()
def evaluate_encoder(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[RegionTextRecord],
    processor: CLOCImageProcessor | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    *,
    class_prompt: str = DEFAULT_CLASS_PROMPT,
    num_workers: int = 0,
    text_batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every encoder metric over ``records`` (see ``docs/evaluation_encoder.md``).

    Args:
        model: a CLOC encoder (moved to ``device`` when given; its dtype is used for images). It runs in eval
            mode and is returned to its previous mode afterwards, so this can be called during training.
        tokenizer: the text tower's tokenizer.
        records: region-text records; those whose image is missing or unreadable are skipped and counted.
        processor: image processor (default: :meth:`CLOCImageProcessor.for_model`).
        batch_size: images per ViT pass.
        class_prompt: template turning a category name into the class text, e.g. ``"a photo of a {}."``.
        num_workers: image-loading worker processes.

    Returns:
        A JSON-ready dict: ``num_images``, ``num_skipped_images``, ``skipped_images`` (first examples with the
        error), ``num_regions``, ``region_classification``, ``region_text_retrieval``, ``image_text_retrieval``,
        ``grounding`` (each ``None`` when the records hold nothing to score it on) and ``settings``.
    """
    if "{}" not in class_prompt:
        raise ValueError(f"class_prompt must contain '{{}}' for the category name, got {class_prompt!r}")
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        return _evaluate(
            model, tokenizer, records, processor, batch_size, class_prompt, num_workers, text_batch_size, progress
        )
    finally:
        model.train(was_training)


def _evaluate(
    model: CLOCModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[RegionTextRecord],
    processor: CLOCImageProcessor | None,
    batch_size: int,
    class_prompt: str,
    num_workers: int,
    text_batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """The body of :func:`evaluate_encoder` (model already in eval mode on its device)."""
    parameter = next(model.parameters())
    processor = processor or CLOCImageProcessor.for_model(model.config)

    # Every distinct string is encoded once: class prompts, region texts, image captions.
    strings = _Strings()
    categories = sorted({r.category for record in records for r in record.regions if r.category})
    class_keys = [strings.index(class_prompt.format(name)) for name in categories]
    class_of = dict(zip(categories, range(len(categories)), strict=True))
    region_keys = [[[strings.index(t) for t in region_texts(r)] for r in record.regions] for record in records]
    caption_keys = [strings.index(r.caption.strip()) if r.caption.strip() else None for r in records]
    text_embeds, text_vectors = encode_texts(model, tokenizer, strings.texts, text_batch_size, progress)

    image_embeds: dict[str, torch.Tensor] = {}  # one per distinct image file
    image_captions: dict[str, set[int]] = {}
    region_embeds: list[torch.Tensor] = []
    region_info: list[tuple[str | None, list[int]]] = []  # (category, text keys) per evaluated region
    predicted: list[torch.Tensor] = []  # (pairs, 4) original-frame boxes per batch, one pair per (region, text)
    targets: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    num_images = 0

    loader = DataLoader(
        _ImageDataset(records, processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
        loaded = []
        for item in batch:
            if item.error is None:
                loaded.append(item)
                continue
            record = records[item.record_index]
            logger.warning("skipping %s: image %s: %s", record.id, record.image_path, item.error)
            skipped.append({"id": record.id, "image": str(record.image_path), "error": item.error})
        if not loaded:
            continue
        num_images += len(loaded)
        pixel_values = torch.stack([item.pixels for item in loaded]).to(parameter.device, parameter.dtype)
        state = model.encode_images(pixel_values)
        for item, embed in zip(loaded, state.image_embeds.float().cpu(), strict=True):
            path = str(records[item.record_index].image_path)
            image_embeds.setdefault(path, embed)
            if caption_keys[item.record_index] is not None:
                image_captions.setdefault(path, set()).add(caption_keys[item.record_index])

        batch_regions = _prompt_batch(model, state, loaded, records, region_keys, text_vectors)
        if batch_regions is not None:
            region_embeds.append(batch_regions.embeds)
            region_info.extend(batch_regions.info)
            predicted.append(batch_regions.predicted)
            targets.append(batch_regions.targets)

    regions = torch.cat(region_embeds) if region_embeds else torch.zeros(0, text_embeds.shape[1])
    return {
        "num_images": num_images,
        "num_skipped_images": len(skipped),
        "skipped_images": skipped[:MAX_SKIPPED_EXAMPLES],
        "num_regions": len(region_info),
        "region_classification": _classification(regions, region_info, text_embeds, class_keys, class_of),
        "region_text_retrieval": _two_way_retrieval(
            regions[[i for i, (_, keys) in enumerate(region_info) if keys]],
            [keys for _, keys in region_info if keys],
            text_embeds,
            "region",
        ),
        "image_text_retrieval": _image_text(image_embeds, image_captions, text_embeds),
        "grounding": box_grounding(torch.cat(predicted), torch.cat(targets)) if sum(len(t) for t in targets) else None,
        "settings": {
            "class_prompt": class_prompt,
            "batch_size": batch_size,
            "image_size": processor.image_size,
            "resize_mode": processor.resize_mode,
            "prompter_pool": model.config.prompter_pool,
            "retrieval_ks": list(RETRIEVAL_KS),
        },
    }


def _classification(
    regions: torch.Tensor,
    region_info: Sequence[tuple[str | None, list[int]]],
    text_embeds: torch.Tensor,
    class_keys: Sequence[int],
    class_of: dict[str, int],
) -> dict[str, Any] | None:
    """Region classification over the categories present in the records (regions without one are left out)."""
    labelled = [i for i, (category, _) in enumerate(region_info) if category]
    if not labelled:
        return None
    labels = torch.tensor([class_of[region_info[i][0]] for i in labelled])  # type: ignore[index]
    names = sorted(class_of, key=class_of.__getitem__)
    return region_classification(regions[labelled], text_embeds[list(class_keys)], labels, class_names=names)


def _image_text(
    image_embeds: dict[str, torch.Tensor], image_captions: dict[str, set[int]], text_embeds: torch.Tensor
) -> dict[str, Any] | None:
    """Image ↔ caption retrieval over the distinct images that have a caption."""
    paths = [path for path in image_embeds if path in image_captions]
    if not paths:
        return None
    images = torch.stack([image_embeds[path] for path in paths])
    return _two_way_retrieval(images, [sorted(image_captions[path]) for path in paths], text_embeds, "image")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_encoder_metrics(metrics: dict[str, Any]) -> str:
    """A one-screen table of :func:`evaluate_encoder`'s result (scores in percent)."""
    lines = [
        f"CLOC encoder evaluation: {metrics['num_images']} images ({metrics['num_skipped_images']} skipped), "
        f"{metrics['num_regions']} regions",
        f"{'task':<24}{'metric':<18}{'score':>14}{'n':>9}",
        "-" * 65,
    ]

    def row(task: str, metric: str, score: str, count: Any) -> None:
        lines.append(f"{task:<24}{metric:<18}{score:>14}{count!s:>9}")

    classification = metrics.get("region_classification")
    if classification:
        row("region classification", "accuracy", _percent(classification["accuracy"]), classification["num_regions"])
        row("", "mean class acc.", _percent(classification["mean_class_accuracy"]), classification["num_classes"])
    else:
        row("region classification", "-", "n/a (no categories)", 0)
    for key, item in (("region_text_retrieval", "region"), ("image_text_retrieval", "image")):
        result = metrics.get(key)
        if not result:
            row(f"{item} <-> text", "R@1 / R@10", "n/a (no texts)", 0)
            continue
        for direction in (f"{item}_to_text", f"text_to_{item}"):
            scores = result[direction]
            source, target = direction.split("_to_")
            score = f"{_percent(scores['R@1'])} / {_percent(scores['R@10'])}"
            row(f"{source} -> {target}", "R@1 / R@10", score, scores["num_queries"])
    grounding = metrics.get("grounding")
    if grounding:
        score = f"{_percent(grounding['acc@0.5'])} / {_percent(grounding['miou'])}"
        row("text -> box", "Acc@0.5 / mIoU", score, grounding["num_boxes"])
    else:
        row("text -> box", "Acc@0.5 / mIoU", "n/a (no texts)", 0)
    for example in metrics.get("skipped_images", [])[:3]:
        lines.append(f"skipped {example['id']}: {example['error']}")
    return "\n".join(lines)


__all__ = ["DEFAULT_CLASS_PROMPT", "encode_texts", "evaluate_encoder", "format_encoder_metrics", "region_texts"]
