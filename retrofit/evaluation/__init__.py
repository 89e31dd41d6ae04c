"""Evaluation: datasets, batched prediction for torch and ONNX models, and the accuracy metrics."""
