"""Flickr30k Entities phrase grounding (``python -m eval flickr30k``): annotations, questions and the Recall@1 score
(:mod:`~eval.flickr30k.task`), the evaluation and its subcommand (:mod:`~eval.flickr30k.evaluate`)."""
