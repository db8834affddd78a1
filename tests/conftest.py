"""Shared fixtures: every test runs on CPU with a fixed seed and small tensors."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
