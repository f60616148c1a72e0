"""Ferret-Bench (``python -m eval ferret-bench``): questions and the judge prompt (:mod:`~eval.ferret_bench.task`),
answering, judging and the subcommand (:mod:`~eval.ferret_bench.evaluate`)."""
