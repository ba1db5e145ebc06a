"""Shared sizes of the tiny models: small enough to build in well under a second and save in
under a megabyte, large enough to have several heads and layers to probe."""

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IMAGE_SIZE = 32
PATCH_SIZE = 8
