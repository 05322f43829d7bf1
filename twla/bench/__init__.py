"""Benchmarks: the quantize-and-compare run (the main job), its report and plots, kernel speed, memory against depth."""
