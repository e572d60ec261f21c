"""Writing and reading compressed checkpoints (compressed-tensors layout)."""
