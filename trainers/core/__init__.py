"""Shared core of the trainers: recipes, data, batches, caches, the loop, checkpoints, diffusion loss, export."""
