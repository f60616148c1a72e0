"""The parts of ``bench.gpu_check``, one module each: (a) :mod:`.train_step`, (b) :mod:`.attention`, (c)
:mod:`.qlora`, (d) :mod:`.generation`, (e) :mod:`.region_precision`, (f) :mod:`.zero3_init`; what they share
(settings, context, results, skipping) in :mod:`.base` and :mod:`.device`, and the report in :mod:`.report`."""
