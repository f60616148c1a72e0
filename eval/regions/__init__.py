"""Grounding and referring on a region-text split (``python -m eval regions``): questions and scores
(:mod:`~eval.regions.tasks`, shared with RefCOCO and the lmms-eval plugin), the evaluation and its subcommand
(:mod:`~eval.regions.evaluate`)."""
