"""Deployment kernels for ternary linear layers (Triton, with pure-torch references)."""
