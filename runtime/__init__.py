"""What runs on every rank: models, weight loading, KV cache, sampler and the step engine."""
