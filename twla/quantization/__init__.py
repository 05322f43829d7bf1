"""The quantization pipeline: configuration, method specs and presets, and its stages (weight
fits, rotations, clipping, reconstruction, allocation), in memory or layer by layer."""
