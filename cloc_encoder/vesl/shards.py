"""VESL's output folder: inputs in a fixed order, cut into shards, each written atomically with a manifest.

Layout of ``out``::

    vesl.json                      # the run: settings, their fingerprint, the number of inputs and their hash
    shard-00000.jsonl              # region-text records of inputs 0 .. shard_size-1 (docs/data_format.md)
    shard-00000.tar                # with output_format tar/both: the same records with their image bytes
    shard-00000.manifest.json      # written after the shard: its input ids, counts, skipped inputs and why
    ...
    summary.json                   # totals over all finished shards (rewritten at the end of every run)
    sizes.json                     # with tar shards: records per finished tar (what the trainer needs)

A shard counts as done only when its manifest exists and matches the run (fingerprint and input ids), so a run
killed at any point restarts at the first unfinished shard, and a half-written shard never exists (the JSONL and
the manifest are each written to a temporary file and renamed). ``read_region_text(out)`` reads every shard; the
manifests are not ``*.jsonl`` and are not read as data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloc_encoder.data.format import (
    ReadReport,
    RegionTextRecord,
    atomic_write_text,
    iter_region_text,
    write_region_text,
)
from cloc_encoder.data.shards import (
    encode_sample,
    iter_tar_inputs,
    read_image_bytes,
    sample_key,
    write_sizes,
    write_tar_shard,
)
from cloc_encoder.vesl.config import VESLConfig, VESLConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
RUN_FILE = "vesl.json"
SUMMARY_FILE = "summary.json"
MANIFEST_SUFFIX = ".manifest.json"
SKIP_EXAMPLES = 20


@dataclass(frozen=True)
class VESLInput:
    """One image to label: a unique id, its absolute path and an existing caption (may be empty)."""

    id: str
    image: str
    caption: str = ""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def list_inputs(config: VESLConfig, report: ReadReport | None = None) -> list[VESLInput]:
    """The run's inputs in a fixed order: image files sorted by relative path (id = that path), or records in
    file order (id = record id; malformed lines are skipped into ``report``). Ids must be unique."""
    if config.webdataset is not None:
        inputs = [VESLInput(key, reference, caption) for key, reference, caption in iter_tar_inputs(config.webdataset)]
    elif config.images is not None:
        root = Path(config.images)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder not found")
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        inputs = [VESLInput(p.relative_to(root).as_posix(), os.path.abspath(p)) for p in files]
    else:
        records = iter_region_text(str(config.records), report=report)
        inputs = [VESLInput(r.id, os.path.abspath(r.image_path), r.caption) for r in records]
    if not inputs:
        raise VESLConfigError(f"no inputs found in {config.images or config.records or config.webdataset}")
    duplicates = [key for key, count in Counter(i.id for i in inputs).items() if count > 1]
    if duplicates:
        raise VESLConfigError(f"input ids must be unique; repeated: {duplicates[:5]}")
    return inputs


def inputs_hash(inputs: Sequence[VESLInput]) -> str:
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(json.dumps([item.id, item.image, item.caption]).encode())
    return digest.hexdigest()[:16]


def shard_inputs(inputs: Sequence[VESLInput], shard_size: int) -> list[list[VESLInput]]:
    return [list(inputs[start : start + shard_size]) for start in range(0, len(inputs), shard_size)]


def prepare_output(config: VESLConfig, inputs: Sequence[VESLInput]) -> Path:
    """Create ``out`` (or check that it holds this same run), remove stale temporary files, write ``vesl.json``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"fingerprint": config.fingerprint(), "inputs": len(inputs), "inputs_hash": inputs_hash(inputs)}
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        for key, value in run.items():
            if previous.get(key) != value:
                raise VESLConfigError(
                    f"{out} holds a VESL run with other settings or inputs ({key} differs): resume it with the same "
                    "settings, or choose a new output folder"
                )
    else:
        atomic_write_text(run_file, json.dumps({**run, "config": config.to_dict()}, indent=2) + "\n")
    for stale in out.glob("*.tmp"):
        stale.unlink()
    return out


def read_manifest(out: Path, index: int) -> dict[str, Any] | None:
    path = out / f"{shard_name(index)}{MANIFEST_SUFFIX}"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def shard_suffixes(output_format: str) -> tuple[str, ...]:
    """The data files of one shard: ``.jsonl``, ``.tar`` or both."""
    return {"jsonl": (".jsonl",), "tar": (".tar",), "both": (".jsonl", ".tar")}[output_format]


def shard_is_done(
    out: Path, index: int, shard: Sequence[VESLInput], fingerprint: str, output_format: str = "jsonl"
) -> bool:
    manifest = read_manifest(out, index)
    return (
        manifest is not None
        and manifest.get("fingerprint") == fingerprint
        and manifest.get("inputs") == [item.id for item in shard]
        and all((out / f"{shard_name(index)}{suffix}").is_file() for suffix in shard_suffixes(output_format))
    )


def write_shard(
    out: Path,
    index: int,
    shard: Sequence[VESLInput],
    records: Sequence[RegionTextRecord],
    skipped: Sequence[tuple[str, str]],
    phrases: int,
    fingerprint: str,
    output_format: str = "jsonl",
) -> dict[str, Any]:
    """Write the shard's JSONL and/or tar (the images of ``shard`` read again), then its manifest (each
    atomically); returns the manifest."""
    if output_format in ("jsonl", "both"):
        write_region_text(records, out / f"{shard_name(index)}.jsonl")
    if output_format in ("tar", "both"):
        sources = {item.id: item.image for item in shard}
        samples = []
        for position, record in enumerate(records):
            source = sources[record.id]
            ext = Path(source.rpartition("#")[2] or source).suffix
            samples.append(encode_sample(record, read_image_bytes(source), ext, sample_key(position)))
        write_tar_shard(out / f"{shard_name(index)}.tar", samples)
    manifest = {
        "shard": index,
        "fingerprint": fingerprint,
        "inputs": [item.id for item in shard],
        "records": len(records),
        "regions": sum(len(record.regions) for record in records),
        "phrases": phrases,
        "skipped": [{"id": key, "reason": reason} for key, reason in skipped],
    }
    atomic_write_text(out / f"{shard_name(index)}{MANIFEST_SUFFIX}", json.dumps(manifest, indent=1) + "\n")
    return manifest


def skip_category(reason: str) -> str:
    """``"unreadable image: OSError: ..."`` → ``"unreadable image"``."""
    return reason.split(":", 1)[0]


def summarize(out: Path, num_shards: int, malformed: Sequence[str] = ()) -> dict[str, Any]:
    """Totals over the finished shards of ``out``; written to ``summary.json``."""
    manifests = [m for m in (read_manifest(out, k) for k in range(num_shards)) if m is not None]
    images = sum(len(m["inputs"]) for m in manifests)
    records = sum(m["records"] for m in manifests)
    skipped = [entry for m in manifests for entry in m["skipped"]]
    summary = {
        "shards_done": len(manifests),
        "shards_total": num_shards,
        "images": images,
        "records": records,
        "regions": sum(m["regions"] for m in manifests),
        "regions_per_image": sum(m["regions"] for m in manifests) / max(1, records),
        "phrases_per_image": sum(m["phrases"] for m in manifests) / max(1, records),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(skip_category(e["reason"]) for e in skipped).items())),
        "skipped_examples": skipped[:SKIP_EXAMPLES],
        "malformed_input_records": len(malformed),
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    sizes = {f"{shard_name(m['shard'])}.tar": m["records"] for m in manifests}
    sizes = {name: count for name, count in sizes.items() if (out / name).is_file()}
    if sizes:
        write_sizes(out, sizes)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines."""
    lines = [
        f"VESL: {summary['shards_done']}/{summary['shards_total']} shards, {summary['images']} images, "
        f"{summary['records']} records written",
        f"  regions per image {summary['regions_per_image']:.2f}, phrases per image {summary['phrases_per_image']:.2f}",
        f"  skipped {summary['skipped']}" + "".join(f", {k}: {v}" for k, v in summary["skipped_by_reason"].items()),
    ]
    if summary["malformed_input_records"]:
        lines.append(f"  malformed input records: {summary['malformed_input_records']}")
    return "\n".join(lines)


__all__ = [
    "IMAGE_SUFFIXES",
    "VESLInput",
    "format_summary",
    "list_inputs",
    "prepare_output",
    "shard_inputs",
    "shard_is_done",
    "shard_name",
    "shard_suffixes",
    "summarize",
    "write_shard",
]
