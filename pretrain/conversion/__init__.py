"""Checkpoint conversion: DCP <-> Hugging Face folders, the reference and DeepSeek-V4.1 layouts."""
