"""Regenerate samples/data and samples/models from scikit-learn's bundled digits.

    python samples/make_samples.py        (needs: pip install -e ".[samples]")

Deterministic: fixed seeds, one thread, a stratified split; running it again writes the same
data and the same weights.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samples.architectures import digits_cnn, digits_mlp  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0


def split_digits(val_fraction: float = 0.25) -> tuple[np.ndarray, ...]:
    """Pixels scaled to [0, 1] as N x 1 x 8 x 8 float32; a stratified, seeded split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    val = np.concatenate([
        rng.permutation(np.flatnonzero(y == label))[: round(val_fraction * np.sum(y == label))]
        for label in range(10)
    ])
    train = np.setdiff1d(np.arange(len(y)), val)
    return x[train], y[train], x[np.sort(val)], y[np.sort(val)]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(SEED)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(targets))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """The CNN as ONNX (opset 17, dynamic batch), for trying the ONNX path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_val, y_val = split_digits()
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "models").mkdir(exist_ok=True)
    np.savez(HERE / "data" / "digits_train.npz", x=x_train, y=y_train)
    np.savez(HERE / "data" / "digits_val.npz", x=x_val, y=y_val)
    example = (torch.from_numpy(x_val[:2]),)
    batch = torch.export.Dim("batch", min=1)
    for name, factory, epochs in (("digits_cnn", digits_cnn, 8), ("digits_mlp", digits_mlp, 30)):
        torch.manual_seed(SEED)
        model = train(factory(), x_train, y_train, epochs)
        program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        torch.export.save(program, HERE / "models" / f"{name}.pt2")
        torch.save(model.state_dict(), HERE / "models" / f"{name}.state.pt")
        if name == "digits_cnn":
            export_onnx(model, example, HERE / "models" / f"{name}.onnx")
        print(f"{name}: validation accuracy {accuracy(model, x_val, y_val):.4f}")


if __name__ == "__main__":
    main()
