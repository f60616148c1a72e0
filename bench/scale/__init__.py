"""A CLOC-LLaVA at real sizes with random weights, for the benchmarks that need one (``bench.real_size`` on CPU,
``bench.gpu_check`` on a GPU): its shapes and configs (:mod:`.shapes`), parameter counts and DeepSpeed's memory
estimates (:mod:`.parameters`), the dtype tracing along the model's path (:mod:`.dtypes`) and a stage-2 batch
(:mod:`.inputs`)."""
