"""RefCOCO / RefCOCO+ / RefCOCOg (``python -m eval refcoco`` / ``reg``): reading the splits (:mod:`~eval.refcoco.data`),
questions and scores (:mod:`~eval.refcoco.evaluate`), the subcommands (:mod:`~eval.refcoco.cli`)."""
