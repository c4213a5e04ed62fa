"""Metrics of a model artifact (perplexity, size) and the gates that compare them."""
