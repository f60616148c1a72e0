"""CLOC pretraining (``python -m train.cloc_pretrain``): config (:mod:`~train.cloc.config`), data
(:mod:`~train.cloc.data`), model/optimizer building (:mod:`~train.cloc.build`), the run's saved state
(:mod:`~train.cloc.run`) and the trainer (:mod:`~train.cloc.pretrain`). The loop, checkpoints, samplers and runtime
are shared with the MLLM stages and live at :mod:`train`'s top level."""
