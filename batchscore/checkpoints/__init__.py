"""Checkpoints: what a model is, from its own files. The types every layout fills
(`checkpoint`); checking and resolving a checkpoint (`models`); its preprocessing as its
transformers image processor reads it (`image_processors`); timm folders and vision_transformer
`.npz` files (`timm_models`); the per-node cache of checkpoints in buckets (`cache`)."""
