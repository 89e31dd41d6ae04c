"""The ONNX path: reading and writing ONNX files, onnxruntime sessions, the ONNX form of each activation, the graph rewrite, and ONNX->torch translation for fine-tuning."""
