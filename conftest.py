"""Repository-wide pytest set-up: markers and the CUDA skip rule.

Markers (registered in pyproject.toml):
  slow       long-running, still run by the README test command
  gpu        needs CUDA; skipped with a reason on machines without it
  multi_gpu  starts several processes (CPU gloo variant runs everywhere)
"""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
