"""Defaults shared by the front ends and the evaluation commands (kept free of heavy imports)."""

DEFAULT_CHECKPOINT = "runs/mllm_tiny_stage2"
"""The CLOC-LLaVA that the demo, the terminal chat, the API and the MLLM benchmarks load when no ``--model`` is
given: the stage-2 run of ``bash scripts/quickstart.sh`` (a training run folder; its latest checkpoint is used)."""

__all__ = ["DEFAULT_CHECKPOINT"]
