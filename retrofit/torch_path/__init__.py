"""The torch path: reading and writing PyTorch model files, finding ReLU call sites in modules and exported programs, rewriting them, and exporting the result to ONNX."""
