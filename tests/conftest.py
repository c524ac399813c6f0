import pytest
import torch

import pyvidfast  # noqa: F401  (loads the op library)
from pyvidfast import samples

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and pyvidfast.build_info()["cuda_kernels"]),
    reason="needs a CUDA device and a build with CUDA kernels",
)


@pytest.fixture(scope="session")
def sample_clips():
    """Paths of the real sample clips (fetched once into the cache)."""
    return {name: samples.sample_path(name) for name in samples.CLIPS}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
