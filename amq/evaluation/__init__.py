"""Evaluation of (quantized) models: held-out perplexity and zero-shot accuracy."""
