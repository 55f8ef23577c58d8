"""Inference: the actor that runs the model (`predict`), how batches reach it (`feed`),
logits to labels and probabilities (`postprocess`), and the actor's sizing line (`sizing`)."""
