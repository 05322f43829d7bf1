"""The model side: architecture adapters, loading and saving checkpoints, tensor files, capturing a layer's inputs."""
