"""The setup scripts' free-space check (``scripts/require_disk.sh``): a clear error before a pip install that would
die halfway on a full disk, and silence when there is room."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "require_disk.sh"


def test_require_disk_refuses_with_a_clear_message(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", str(SCRIPT), "1000000", "the test venv"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert "error: the test venv needs about 1000000 GiB free on" in run.stderr
    assert "GiB left" in run.stderr


def test_require_disk_passes_when_there_is_room(tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(SCRIPT), "0", "x"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert (run.returncode, run.stderr) == (0, "")
