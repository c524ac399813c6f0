"""Loads the compiled op library (pyvidfast/_C*.so) into torch's dispatcher."""

import json
from functools import cache
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def library_file() -> Path | None:
    """The built library next to this file, or None before the first build."""
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so"))
    return candidates[0] if candidates else None


@cache
def load_library() -> Path:
    path = library_file()
    if path is None:
        raise ImportError(
            f"pyvidfast's compiled library (_C.so) is missing from {_PACKAGE_DIR}. Build it with `make build` in the "
            "source tree, or install with `pip install --no-build-isolation .` (see docs/install.md)."
        )
    torch.ops.load_library(str(path))
    return path


@cache
def build_info() -> dict:
    """What the loaded library was built with: CUDA kernels and architectures, torch version, NVTX."""
    load_library()
    info = json.loads(torch.ops.vidfast._build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    return info
