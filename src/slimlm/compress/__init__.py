"""Structured pruning: importance estimation, width and depth selection, budget search, surgery."""
