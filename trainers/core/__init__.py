"""Shared core of the trainers: recipes, base loading, data, caching, diffusion loss, checkpoints, sampling."""
