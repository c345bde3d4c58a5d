"""The adapter store: the only reader and writer of ``registry.json`` and the versioned adapter dirs."""
