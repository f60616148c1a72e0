"""Moved to :mod:`eval.encoder.metrics`; this module only re-exports it, so that
imports from ``eval.encoder_metrics`` keep working."""

from eval.encoder.metrics import box_grounding, region_classification, retrieval_recall, topk_accuracy

__all__ = ["box_grounding", "region_classification", "retrieval_recall", "topk_accuracy"]
