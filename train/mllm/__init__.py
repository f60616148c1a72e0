"""MLLM training, stages 1 and 2 (``python -m train.mllm_train``): config (:mod:`~train.mllm.config`), conversation
data (:mod:`~train.mllm.conversations`, :mod:`~train.mllm.data`), building the model (:mod:`~train.mllm.build`,
:mod:`~train.mllm.zero3`, :mod:`~train.mllm.trainable`, :mod:`~train.mllm.projector`), the run's saved state
(:mod:`~train.mllm.run`), the trainer (:mod:`~train.mllm.train`, :mod:`~train.mllm.stages`) and LoRA merging
(:mod:`~train.mllm.merge_lora`). The loop, checkpoints, samplers and runtime are shared with CLOC pretraining and
live at :mod:`train`'s top level."""
