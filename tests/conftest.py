"""Shared fixtures: tiny random models per architecture, created once per test session."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import ARCHS, make_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A factory: tiny_model_dir("qwen3") -> folder (made on first use)."""
    made = {}

    def get(kind: str = "llama"):
        if kind not in made:
            made[kind] = make_tiny_model(tmp_path_factory.mktemp(kind), kind)
        return made[kind]

    return get


ALL_ARCHS = list(ARCHS)
