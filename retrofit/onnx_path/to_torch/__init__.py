"""ONNX->torch translation: a graph builder and per-op-family converters registered by (op_type, since_version)."""
