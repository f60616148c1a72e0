"""Evaluation of a CLOC encoder alone on region-text records (``python -m eval encoder``): the run
(:mod:`~eval.encoder.evaluate`) and its metrics as pure functions (:mod:`~eval.encoder.metrics`). Zero-shot
classification is :mod:`eval.zeroshot`."""
