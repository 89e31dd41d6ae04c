"""retrofit.evaluation.datasets.splits: stratified, seeded, disjoint, and the total is what was
asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retrofit.evaluation.datasets.load import load_dataset
from retrofit.evaluation.datasets.splits import split_train_val


def test_split_is_stratified_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    y = np.array([0] * 10 + [1] * 20 + [2] * 5)
    np.savez(path, x=np.arange(35, dtype=float).reshape(35, 1), y=y)
    data = load_dataset(path)
    train, val = split_train_val(data, val_fraction=0.2, seed=3)
    assert len(train) + len(val) == 35 and len(val) == 7
    assert torch.bincount(val.targets, minlength=3).tolist() == [2, 4, 1]
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    again_train, again_val = split_train_val(data, val_fraction=0.2, seed=3)
    assert again_val.indices.tolist() == val.indices.tolist()
    other = split_train_val(data, val_fraction=0.2, seed=4)[1]
    assert other.indices.tolist() != val.indices.tolist()
    assert val.num_classes == 3 and val.sample_shape == (1,)
    x, label = val[0]
    assert label == int(y[int(x)])


def test_split_hands_out_rounding_remainders_to_reach_the_total(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((9, 1)), y=np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    train, val = split_train_val(load_dataset(path), val_fraction=0.5)
    assert len(val) == 5 and len(train) == 4
    assert sorted(torch.bincount(val.targets, minlength=3).tolist()) == [1, 2, 2]


def test_split_keeps_a_singleton_class_in_train(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((5, 1)), y=np.array([0, 0, 0, 0, 1]))
    train, val = split_train_val(load_dataset(path), val_fraction=0.4)
    assert 1 in train.targets.tolist() and 1 not in val.targets.tolist()
