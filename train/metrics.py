"""Training metrics: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard, written by rank 0 only.

A resumed run first drops the lines a killed run logged after its last checkpoint, and TensorBoard purges the
same steps (``purge_step``), so both files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

from train.checkpoint import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Appends records to ``output_dir/metrics.jsonl`` and mirrors numeric fields to TensorBoard.

    Args:
        output_dir: the run's folder.
        resume_step: when resuming, the checkpoint's step; later records of an earlier run are dropped.
        tensorboard: also write TensorBoard events under ``output_dir/tensorboard``.
        enabled: False on ranks other than 0 (every call is then a no-op).
    """

    def __init__(
        self, output_dir: str | Path, *, resume_step: int | None, tensorboard: bool = True, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [line for line in self._read_lines() if json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR), purge_step=purge)

    def _read_lines(self) -> list[str]:
        return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append ``record`` (must hold ``step``); numeric fields go to TensorBoard as ``prefix/name``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, numbers.Number) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLogger", "read_metrics"]
