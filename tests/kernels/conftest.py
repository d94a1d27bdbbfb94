"""Kernel tests run on the GPU when there is one, else in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before `martlet.kernels` is
imported. Pytest loads this file before it imports the test modules of this folder.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
