"""Hugging Face interchange: safetensors streaming, name maps, the remote-code Engram model."""
