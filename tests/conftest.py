"""Test tiers: ``cpu`` (default), ``gpu`` (auto-skipped without CUDA), ``oracle`` (other projects'
implementations). Without CUDA, Triton kernels run under the interpreter on CPU tensors, so
``TRITON_INTERPRET=1`` is set here, before any kernel module is imported, as is
``IFK_POISON_OUTPUTS=1``."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every output the package allocates is NaN/sentinel-filled first (triton_kernels._alloc), so a
# kernel that skips part of its output fails every test.
os.environ["IFK_POISON_OUTPUTS"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (real sizes, bf16, graphs)")
    config.addinivalue_line("markers", "oracle: checks against another project's implementation")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the gpu tier runs on a GPU machine (bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
