"""Moved to :mod:`eval.regions.evaluate`; this module only re-exports it, so that
imports from ``eval.region_eval`` keep working."""

from eval.regions.evaluate import REGION_TASKS, add_parser, evaluate_regions, format_region_metrics, run

__all__ = ["REGION_TASKS", "add_parser", "evaluate_regions", "format_region_metrics", "run"]
