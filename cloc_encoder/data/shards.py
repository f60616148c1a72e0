"""Region-text data as WebDataset tar shards: the streamed form of ``docs/data_format.md``, and its writer.

One sample is two members of a POSIX tar, grouped by their key (the name up to the first dot)::

    000000000042.png     # the image file's bytes, unchanged (any of IMAGE_EXTENSIONS)
    000000000042.json    # the region-text record (format.py) with "image" = the image member's name

The JSON holds ``id``, ``width``, ``height`` (the original image's size), ``caption``, ``regions`` (``box``:
``xyxy`` normalised to ``[0, 1]`` by that width and height, ``docs/boxes.md``) and optionally ``source``; keys are
the sample's position in the shard (record ids may hold dots or slashes, which tar keys may not). A folder of
shards holds ``shard-00000.tar``, ``shard-00001.tar``, ... and ``sizes.json`` (``{"shard-00000.tar": 1000, ...}``,
the samples per shard, as open_clip reads it), which the trainer needs to give every rank the same number of
batches. Shards are addressed as WebDataset does: a brace pattern (``shards/shard-{00000..00099}.tar``), a list
joined by ``::``, ``http(s)://`` URLs, or ``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp s3://bucket/shard-00000.tar -``).

Command line (JSONL + image folder → shards)::

    python -m cloc_encoder.data.shards --data train.jsonl --out shards/ --samples-per-shard 1000
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from cloc_encoder.data.format import (
    ReadReport,
    RecordError,
    RegionTextRecord,
    atomic_file,
    atomic_write_text,
    iter_region_text,
    parse_record,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SIZES_FILE = "sizes.json"
SHARD_PREFIX = "shard"
TAR_MEMBER_SEPARATOR = "#"
"""An image inside a local tar is referred to as ``/path/to/00000.tar#000000123.jpg`` (VESL on img2dataset)."""
_TAR_NAME = re.compile(r"[^\s/]+\.(?:tar|tgz|tar\.gz)\b")


def shard_file_name(index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}-{index:05d}.tar"


def sample_key(position: int) -> str:
    """The tar key of the sample at ``position`` in its shard (digits only: no dots, no slashes)."""
    return f"{position:012d}"


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs of a brace pattern / ``::``-joined list (WebDataset's expansion) or of a list of URLs."""
    if isinstance(spec, str):
        return list(wds.shardlists.expand_urls(spec))
    return [url for item in spec for url in wds.shardlists.expand_urls(item)]


def is_shard_spec(spec: str | Sequence[str]) -> bool:
    """Whether ``spec`` names tar shards (every expanded URL holds a ``.tar``/``.tgz`` name), not JSONL."""
    urls = expand_shards(spec) if spec else []
    return bool(urls) and all(_TAR_NAME.search(url) for url in urls)


def shard_name(url: str) -> str:
    """The shard's file name inside any URL form (``pipe:aws s3 cp s3://b/x/shard-00001.tar -`` →
    ``shard-00001.tar``): the last tar name in it; the key into ``sizes.json``."""
    names = _TAR_NAME.findall(url)
    if not names:
        raise ValueError(f"{url!r} names no .tar shard")
    return names[-1]


def read_sizes(location: str) -> dict[str, int]:
    """``sizes.json`` from a local path or any WebDataset URL (``http://``, ``pipe:``): shard name → samples."""
    with wds.gopen(location, "rb") as stream:
        data = json.loads(stream.read().decode("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, int) and v >= 0 for v in data.values()):
        raise ValueError(f"{location}: expected a JSON object of shard name → sample count")
    return {str(key): int(value) for key, value in data.items()}


def default_sizes_location(urls: Sequence[str]) -> str | None:
    """``sizes.json`` beside the first shard when the shards are local files (else ``None``: give it explicitly)."""
    first = urls[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    return str(Path(first).with_name(SIZES_FILE))


def write_sizes(folder: str | os.PathLike[str], sizes: dict[str, int]) -> Path:
    path = Path(folder) / SIZES_FILE
    atomic_write_text(path, json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    return path


# ----- reading --------------------------------------------------------------------------------------------------


def image_member(sample: dict[str, Any]) -> str | None:
    """The image extension present in a WebDataset sample (``"png"``, ``"jpg"``, ...), or ``None``."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def decode_sample(sample: dict[str, Any]) -> tuple[RegionTextRecord, bytes]:
    """A raw WebDataset sample (member extension → bytes, plus ``__key__``/``__url__``) → its record and image
    bytes. Raises :class:`RecordError` naming the shard and key when the JSON or the image member is missing or
    malformed (the image bytes themselves are decoded by the caller)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    ext = image_member(sample)
    if ext is None or "json" not in sample:
        raise RecordError(f"{where}: a sample needs an image member and a .json member, got {sorted(sample)}")
    try:
        data = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{where}: invalid JSON ({error})") from error
    return parse_record(data, where=where), sample[ext]


def iter_shard_records(urls: Sequence[str], limit: int | None = None) -> Iterator[RegionTextRecord]:
    """The records of the first ``limit`` samples of ``urls`` in order (images not decoded; malformed samples and
    unreadable shards are logged and left out), e.g. for a tokenizer's training texts."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(handler=log_and_continue))
    for sample in itertools.islice(pipeline, limit):
        try:
            yield decode_sample(sample)[0]
        except RecordError as error:
            logger.warning("skipping a malformed sample: %s", error)


def log_and_continue(error: Exception) -> bool:
    """WebDataset handler for a shard that cannot be opened or read: log it and go on with the next shard."""
    logger.warning("skipping the rest of a shard: %s: %s", type(error).__name__, error)
    return True


def is_tar_member(reference: str) -> bool:
    """Whether ``reference`` names a member of a local tar (``archive.tar#member.jpg``)."""
    archive, separator, _ = reference.rpartition(TAR_MEMBER_SEPARATOR)
    return bool(separator) and bool(_TAR_NAME.search(Path(archive).name))


def iter_tar_inputs(spec: str) -> Iterator[tuple[str, str, str]]:
    """``(id, image reference, caption)`` of every image in local WebDataset tars (an img2dataset download: a
    folder of ``*.tar`` or a brace pattern), tars in name order, samples in tar order. The caption is ``{key}.txt``
    or else the ``caption`` of ``{key}.json``; the id is ``<tar stem>/<key>``; the reference is
    ``/abs/archive.tar#<key>.<ext>`` (:func:`read_image_bytes`)."""
    folder = Path(spec)
    paths = sorted(folder.glob("*.tar")) if folder.is_dir() else [Path(url) for url in expand_shards(spec)]
    for path in paths:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        archive = _open_tar(os.path.abspath(path))
        for info in archive.getmembers():
            if info.isfile() and "." in Path(info.name).name:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext.lower()] = info
        for key, files in members.items():
            ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
            if ext is None:
                continue
            caption = ""
            if "txt" in files:
                caption = archive.extractfile(files["txt"]).read().decode("utf-8", "replace")  # type: ignore[union-attr]
            elif "json" in files:
                meta = json.loads(archive.extractfile(files["json"]).read() or b"{}")  # type: ignore[union-attr]
                caption = str(meta.get("caption") or "") if isinstance(meta, dict) else ""
            reference = f"{os.path.abspath(path)}{TAR_MEMBER_SEPARATOR}{files[ext].name}"
            yield f"{path.stem}/{key}", reference, caption.strip()


def read_image_bytes(reference: str) -> bytes:
    """The bytes of an image file, or of a member of a local tar (``archive.tar#member.jpg``)."""
    archive, _, member = reference.rpartition(TAR_MEMBER_SEPARATOR)
    if is_tar_member(reference):
        handle = _open_tar(archive).extractfile(member)
        if handle is None:
            raise FileNotFoundError(f"{reference}: no such file member")
        return handle.read()
    return Path(reference).read_bytes()


@functools.lru_cache(maxsize=2)
def _open_tar(path: str) -> tarfile.TarFile:
    """A local tar opened for random access (members indexed once; the last two archives are kept open)."""
    return tarfile.open(path, "r:*")


# ----- writing --------------------------------------------------------------------------------------------------


def encode_sample(record: RegionTextRecord, image: bytes, image_ext: str, key: str) -> dict[str, Any]:
    """One record and its image file's bytes → a WebDataset sample (``image_ext`` without the dot, lower case)."""
    ext = image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"{record.id}: image extension {ext!r} is not one of {IMAGE_EXTENSIONS}")
    data = record.to_json()
    data["image"] = f"{key}.{ext}"
    return {"__key__": key, ext: image, "json": json.dumps(data, ensure_ascii=False).encode("utf-8")}


def write_tar_shard(path: str | os.PathLike[str], samples: Iterable[dict[str, Any]]) -> int:
    """Write WebDataset samples into one tar at ``path`` atomically (temporary file, fsync, rename: a reader never
    sees half a shard); member times are fixed so equal inputs give byte-identical shards. Returns the count."""
    count = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle, wds.TarWriter(handle, encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


@dataclass
class ConversionReport:
    """What :func:`write_shards` wrote and skipped (``skipped``: ``"id (path): reason"``)."""

    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.samples} samples in {len(self.shards)} shards, {len(self.skipped)} records skipped"


def _chunks(records: Iterable[RegionTextRecord], size: int) -> Iterator[list[RegionTextRecord]]:
    chunk: list[RegionTextRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    records: Iterable[RegionTextRecord],
    out: str | os.PathLike[str],
    samples_per_shard: int,
    *,
    prefix: str = SHARD_PREFIX,
) -> ConversionReport:
    """Region-text records whose images are files → ``out/<prefix>-NNNNN.tar`` + ``out/sizes.json``.

    Records are taken in order, ``samples_per_shard`` per shard (the last shard may hold fewer); a record whose
    image file cannot be read (missing, no permission) or has no image extension is left out and reported. Image
    bytes are copied unchanged (no re-encoding; a corrupt image stays corrupt and is skipped by the trainer).
    Memory holds one shard's records at a time.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    sizes: dict[str, int] = {}
    for index, chunk in enumerate(_chunks(records, samples_per_shard)):
        samples = []
        for record in chunk:
            ext = Path(record.image.split(TAR_MEMBER_SEPARATOR)[-1]).suffix.lower().lstrip(".")
            try:
                image = read_image_bytes(str(record.image_path))
                samples.append(encode_sample(record, image, ext, sample_key(len(samples))))
            except (OSError, ValueError, KeyError) as error:
                report.skipped.append(f"{record.id} ({record.image_path}): {type(error).__name__}: {error}")
        name = shard_file_name(index, prefix)
        sizes[name] = write_tar_shard(out / name, samples)
        report.shards.append(name)
        report.samples += sizes[name]
    if not report.shards:
        raise ValueError("no records to write")
    write_sizes(out, sizes)
    return report


# ----- command line ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloc_encoder.data.shards",
        description="Region-text JSONL (+ its image files) → WebDataset tar shards and sizes.json.",
    )
    parser.add_argument("--data", required=True, help="region-text JSONL file or folder of JSONL shards")
    parser.add_argument("--out", required=True, help="output folder of <prefix>-NNNNN.tar and sizes.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--prefix", default=SHARD_PREFIX, help="shard file name prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    malformed = ReadReport()
    try:
        report = write_shards(
            iter_region_text(args.data, report=malformed), args.out, args.samples_per_shard, prefix=args.prefix
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {report.summary()}; {len(malformed.skipped)} malformed JSONL lines skipped")
    for line in (malformed.skipped + report.skipped)[:5]:
        print(f"  skipped: {line}")
    return 0


__all__ = [
    "IMAGE_EXTENSIONS",
    "SIZES_FILE",
    "ConversionReport",
    "decode_sample",
    "default_sizes_location",
    "encode_sample",
    "expand_shards",
    "image_member",
    "is_shard_spec",
    "is_tar_member",
    "iter_shard_records",
    "iter_tar_inputs",
    "log_and_continue",
    "read_image_bytes",
    "read_sizes",
    "sample_key",
    "shard_file_name",
    "shard_name",
    "write_shards",
    "write_sizes",
    "write_tar_shard",
]


if __name__ == "__main__":
    sys.exit(main())
