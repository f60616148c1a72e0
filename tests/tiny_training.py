"""Model overrides shared by the training tests: a 1-layer CLOC encoder on 32-px images."""

TINY_CLOC_OVERRIDES = {
    "vision_config": {"image_size": 32, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128},
    "text_config": {
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 16,
    },
    "projection_dim": 32,
}
