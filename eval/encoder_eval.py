"""Moved to :mod:`eval.encoder.evaluate`; this module only re-exports it, so that
imports from ``eval.encoder_eval`` keep working."""

from eval.encoder.evaluate import (
    DEFAULT_CLASS_PROMPT,
    encode_texts,
    evaluate_encoder,
    format_encoder_metrics,
    region_texts,
)

__all__ = ["DEFAULT_CLASS_PROMPT", "encode_texts", "evaluate_encoder", "format_encoder_metrics", "region_texts"]
