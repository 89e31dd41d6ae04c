"""The activations' tests draw from torch's global generator: each starts from one seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # every test sees the same random inputs
