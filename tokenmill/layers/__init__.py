"""Shared building blocks of the models: attention backends, linear layers, norms, RoPE, sampler."""
