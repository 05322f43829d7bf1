"""Text for calibration and evaluation: the built-in corpora, tokenizing, windows, provenance."""
