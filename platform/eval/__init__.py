"""Evaluation of a trained model: loss vs context length and S-NIAH (long_context)."""
