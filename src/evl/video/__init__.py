"""Video input: list files, decoding, frame sampling and transforms."""
