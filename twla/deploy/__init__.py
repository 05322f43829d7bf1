"""Deployment: packed ternary layers, the packed checkpoint format (save, load, upgrade), the transformers quantizer."""
