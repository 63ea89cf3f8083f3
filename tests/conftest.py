"""Hypothesis profiles (``dev`` default, ``ci`` chosen by HYPOTHESIS_PROFILE=ci) and GPU skipping."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests unless CUDA is present (checked lazily: torch may be absent)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA GPUs")
        for item in gpu_items:
            item.add_marker(skip)
