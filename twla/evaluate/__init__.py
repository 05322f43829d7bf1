"""Evaluation: perplexity, zero-shot tasks, the lm-evaluation-harness adapter, text generation."""
