"""Test helpers: tiny random-weight Hugging Face checkpoints built locally, no hub."""
