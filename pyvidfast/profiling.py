"""NVTX ranges for Python-side stages, in the "pyvidfast" domain (the C++ kernels use the same domain).

Off by default: ``nvtx_range`` returns a shared null context unless VIDFAST_NVTX=1 is set (or ``enable_nvtx()``
is called) and the ``nvtx`` package is installed, so instrumented code costs one attribute check.
"""

import contextlib
import os

_NULL = contextlib.nullcontext()
_domain = None


def enable_nvtx(enabled: bool = True) -> bool:
    """Turns Python NVTX ranges on or off; returns whether they are on."""
    global _domain
    _domain = None
    if enabled:
        try:
            import nvtx
        except ImportError:
            return False
        _domain = nvtx.get_domain("pyvidfast")
    return _domain is not None


def nvtx_range(name: str):
    """Context manager: an NVTX range named ``name`` when enabled, else a no-op."""
    if _domain is None:
        return _NULL
    import nvtx

    return nvtx.annotate(name, domain="pyvidfast")


enable_nvtx(os.environ.get("VIDFAST_NVTX", "0") == "1")
