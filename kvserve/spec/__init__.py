"""Speculative decoding: draft tokens from text seen before, verified by the engine in one forward pass."""
