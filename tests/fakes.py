"""Test doubles shared by the test modules (``from fakes import ...``; tests/ is on sys.path)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from autocontour.model_config import ModelConfig


class FakeBackend:
    """An inference backend whose logits are a function of the input (default: all background)."""

    name = "fake"

    def __init__(self, model: ModelConfig, fn: Callable[[np.ndarray], np.ndarray] | None = None):
        self.model = model
        self.fn = fn or (lambda x: np.zeros((x.shape[0], model.output_count, *x.shape[2:]), np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, Z, Y, X) -> (N, C, Z, Y, X) logits."""
        return self.fn(x)
