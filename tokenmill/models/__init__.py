"""Model architectures, their registry, and the loaders (HF folders and GGUF files)."""
