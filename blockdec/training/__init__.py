"""Training on an embedded corpus: data, tokenizers, losses, the trainer, regimes."""
