"""The one path from a Recipe to an evaluated artifact (``run``) and the block sweep it drives."""
