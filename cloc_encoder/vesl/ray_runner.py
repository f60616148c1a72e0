"""VESL on a Ray cluster with ``ray.data`` (optional extra: ``pip install -e '.[vesl]'``).

One dataset row is one pending shard (its items as JSON). The stages are the single-machine ones
(:mod:`cloc_encoder.vesl.pipeline`) on the same chunks of ``batch_size`` inputs, so a shard comes out the same on a
cluster as on one machine:

1. captioner actors (GPU when ``gpus_per_actor > 0``): load the images, caption them;
2. phrase tasks (CPU): noun phrases of every caption;
3. detector actors (GPU): load the images again, run OWLv2;
4. the driver writes each finished shard and its manifest as it arrives (atomic, resumable as on one machine).

Ray is imported only when a Ray run starts.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

from cloc_encoder.vesl.config import VESLConfig
from cloc_encoder.vesl.phrases import PhraseExtractor
from cloc_encoder.vesl.pipeline import (
    Item,
    build_captioner,
    build_detector,
    build_extractor,
    caption_items,
    chunks,
    detect_items,
    finish_shard,
    load_images,
    phrase_items,
    plan_run,
)
from cloc_encoder.vesl.shards import summarize

RAY_HELP = "the Ray runner needs ray[data]: pip install 'ray[data]' (or pip install -e '.[vesl]')"


@dataclass
class RayOptions:
    """How the stages are spread over the cluster.

    ``address`` is passed to ``ray.init`` when Ray is not initialised yet (``None``: a local instance, or the
    cluster named by ``RAY_ADDRESS``).
    """

    address: str | None = None
    captioner_actors: int = 1
    detector_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    cpus_per_phrase_task: float = 1.0


def _payload(items: list[Item]) -> str:
    return json.dumps([item.to_json() for item in items])


def _items(payload: str) -> list[Item]:
    return [Item.from_json(data) for data in json.loads(payload)]


class CaptionStage:
    """Ray actor: load each chunk's images and caption them (or take the inputs' captions)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = VESLConfig.from_dict(config)
        self.captioner = build_captioner(self.config)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        items = _items(row["payload"])
        for chunk in chunks(items, self.config.batch_size):
            caption_items(chunk, load_images(chunk), self.captioner, self.config.recaption)
        return {"shard": row["shard"], "payload": _payload(items)}


@functools.lru_cache(maxsize=4)
def _default_extractor(config_json: str) -> PhraseExtractor:
    return build_extractor(VESLConfig.from_dict(json.loads(config_json)))


def phrase_stage(row: dict[str, Any], config_json: str, extractor: PhraseExtractor | None) -> dict[str, Any]:
    """Ray task: noun phrases of a shard's captions."""
    items = _items(row["payload"])
    phrase_items(items, extractor or _default_extractor(config_json))
    return {"shard": row["shard"], "payload": _payload(items)}


class DetectStage:
    """Ray actor: load each chunk's images again and localise their phrases with OWLv2."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = VESLConfig.from_dict(config)
        self.detector = build_detector(self.config)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        items = _items(row["payload"])
        for chunk in chunks(items, self.config.batch_size):
            detect_items(chunk, load_images(chunk), self.detector)
        return {"shard": row["shard"], "payload": _payload(items)}


def run_vesl_ray(
    config: VESLConfig, options: RayOptions | None = None, *, extractor: PhraseExtractor | None = None
) -> dict[str, Any]:
    """Run (or resume) VESL with ``ray.data``; same outputs, manifests and summary as :func:`run_vesl`.

    ``extractor`` (optional) is shipped to the phrase tasks; by default each worker builds the paper's extractor
    with NLTK's tagger, whose data must then be installed on every node.
    """
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_HELP) from error
    from tqdm.auto import tqdm

    options = options or RayOptions()
    start = time.perf_counter()
    plan = plan_run(config)
    if plan.pending:
        if not ray.is_initialized():
            ray.init(address=options.address)
        config_dict = config.to_dict()
        config_json = json.dumps(config_dict, sort_keys=True)
        if extractor is None:
            _default_extractor(config_json)  # fail on the driver, with the install hint, if the tagger is missing
        rows = [{"shard": k, "payload": _payload([Item(entry) for entry in plan.shards[k]])} for k in plan.pending]
        actor_args = {"num_gpus": options.gpus_per_actor, "num_cpus": options.cpus_per_actor}
        dataset = (
            ray.data.from_items(rows)
            .map(
                CaptionStage,
                fn_constructor_kwargs={"config": config_dict},
                concurrency=options.captioner_actors,
                **actor_args,
            )
            .map(
                phrase_stage,
                fn_kwargs={"config_json": config_json, "extractor": extractor},
                num_cpus=options.cpus_per_phrase_task,
            )
            .map(
                DetectStage,
                fn_constructor_kwargs={"config": config_dict},
                concurrency=options.detector_actors,
                **actor_args,
            )
        )
        total = sum(len(plan.shards[k]) for k in plan.pending)
        with tqdm(total=total, unit="img", desc="VESL (ray)", disable=not config.progress) as bar:
            for row in dataset.iter_rows():
                index = int(row["shard"])
                finish_shard(plan.out, index, _items(row["payload"]), config)
                bar.update(len(plan.shards[index]))
    summary = summarize(plan.out, len(plan.shards), plan.malformed)
    summary["elapsed_s"] = round(time.perf_counter() - start, 2)
    return summary


__all__ = ["CaptionStage", "DetectStage", "RayOptions", "phrase_stage", "run_vesl_ray"]
