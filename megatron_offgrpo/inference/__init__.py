"""Inference with the trained model: scoring datasets (per-token log-probs with the training engine itself) and
generation for evaluation and student rollouts."""
