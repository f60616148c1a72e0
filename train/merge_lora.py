"""Moved to :mod:`train.mllm.merge_lora`; this module only re-exports it, so that
``python -m train.merge_lora`` and imports from ``train.merge_lora`` keep working."""

import sys

from train.mllm.merge_lora import load_lora_model, main, merge_lora

__all__ = ["load_lora_model", "main", "merge_lora"]

if __name__ == "__main__":
    sys.exit(main())
