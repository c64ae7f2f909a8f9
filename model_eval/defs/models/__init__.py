"""Asset group `models`: the model registry."""
