"""Evaluation: datasets, batched prediction for torch and ONNX models (one checked model call per
batch, shared with fine-tuning), the progress bar, and the accuracy metrics."""
