"""Sample architectures, data and models for trying cadrelu (see samples/README.md)."""
