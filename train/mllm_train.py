"""Moved to :mod:`train.mllm.train`; this module only re-exports it, so that
``python -m train.mllm_train`` and imports from ``train.mllm_train`` keep working."""

import sys

from train.mllm.train import MLLMTrainResult, main, train_mllm

__all__ = ["MLLMTrainResult", "main", "train_mllm"]

if __name__ == "__main__":
    sys.exit(main())
