"""hf_posenc: swap the positional encoding of Hugging Face Transformers models."""
