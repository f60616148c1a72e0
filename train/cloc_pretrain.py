"""Moved to :mod:`train.cloc.pretrain`; this module only re-exports it, so that
``python -m train.cloc_pretrain`` and imports from ``train.cloc_pretrain`` keep working."""

import sys

from train.cloc.pretrain import LOSS_TERMS, TrainResult, main, train_cloc

__all__ = ["LOSS_TERMS", "TrainResult", "main", "train_cloc"]

if __name__ == "__main__":
    sys.exit(main())
