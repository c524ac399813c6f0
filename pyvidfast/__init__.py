"""pyvidfast: fast CPU and CUDA kernels for video transformers, exposed as ``torch.ops.vidfast.*``."""

import importlib

from pyvidfast._library import build_info, library_file, load_library

__version__ = "0.1.0"

# A fresh source tree has no library until `make build`; the parts that need none (`python -m pyvidfast samples`,
# pyvidfast.samples) work before it, and the ops raise an ImportError saying how to build.
if library_file() is not None:
    library_path = load_library()
    from pyvidfast import ops  # noqa: E402  (registers fakes and autograd after the library is loaded)


def __getattr__(name: str):
    if name == "library_path":
        return load_library()
    if name == "ops":
        return importlib.import_module("pyvidfast.ops")
    raise AttributeError(f"module 'pyvidfast' has no attribute {name!r}")


__all__ = ["build_info", "ops", "__version__"]
