"""Atomic writes (``cloc_encoder.data.format``): whole files or none, and the permissions a plain ``open`` gives,
so a cluster's other users can read checkpoints' metadata and data shards."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloc_encoder.data.format import RegionTextRecord, atomic_write_text, write_region_text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:  # the process umask applies, as for every file the user writes
        handle.write("x")
    atomic_write_text(tmp_path / "atomic.txt", "hello\n")
    write_region_text([RegionTextRecord(id="a", image="a.png", width=4, height=4)], tmp_path / "shard.jsonl")
    assert mode(tmp_path / "atomic.txt") == mode(plain) == mode(tmp_path / "shard.jsonl")
    assert mode(plain) & 0o044, "the test needs a umask that lets the group or others read (e.g. 022)"
    assert (tmp_path / "atomic.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.txt", "plain.txt", "shard.jsonl"]


def test_replacing_keeps_the_files_mode_and_a_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "latest"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and mode(path) == 0o640

    def records():
        yield RegionTextRecord(id="a", image="a.png", width=4, height=4)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_region_text(records(), path)
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left behind
