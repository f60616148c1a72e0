"""Moved to :mod:`eval.refcoco.evaluate`; this module only re-exports it, so that
imports from ``eval.refcoco_eval`` keep working."""

from eval.refcoco.evaluate import (
    REC_PROMPTS,
    REG_PROMPTS,
    evaluate_rec,
    evaluate_reg,
    format_rec_metrics,
    format_reg_metrics,
    rec_question_text,
    rec_questions,
    reg_questions,
)

__all__ = [
    "REC_PROMPTS",
    "REG_PROMPTS",
    "evaluate_rec",
    "evaluate_reg",
    "format_rec_metrics",
    "format_reg_metrics",
    "rec_question_text",
    "rec_questions",
    "reg_questions",
]
