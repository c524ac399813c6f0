"""pyvidfast: fast CPU and CUDA kernels for video transformers, exposed as ``torch.ops.vidfast.*``."""

from pyvidfast._library import build_info, load_library

__version__ = "0.1.0"
library_path = load_library()

from pyvidfast import ops  # noqa: E402  (registers fakes and autograd after the library is loaded)

__all__ = ["build_info", "ops", "__version__"]
