"""The model side of a step: weights, KV pool, attention backend, one forward pass."""
