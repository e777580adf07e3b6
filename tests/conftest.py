"""Shared test helpers: tiny odd-sized configs, seeded generators, generated videos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from evl.devices import DEVICE_ENV

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# The device of the device-sensitive tests and of every command the tests run: the CPU unless
# EVL_TEST_DEVICE names another (``EVL_TEST_DEVICE=cuda pytest`` on a machine with a GPU). Set before any
# test runs, so commands never pick a GPU by themselves.
TEST_DEVICE = os.environ.get("EVL_TEST_DEVICE", "cpu")
os.environ[DEVICE_ENV] = TEST_DEVICE


@pytest.fixture
def device() -> torch.device:
    """The device the device-sensitive tests run on (see TEST_DEVICE)."""
    return torch.device(TEST_DEVICE)
