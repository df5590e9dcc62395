"""The dry run's simulator: one traced training step on fake tensors, and its cost model."""
