"""Inference and analysis on checkpoints: evaluate, generate, probes, analyze (CLIs: launch.*)."""
