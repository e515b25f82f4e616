"""Model building blocks, mirroring the Hugging Face module tree (norm, rotary, attention, MLP, decoder)."""
