"""pyvidfast's build backend: scikit-build-core, behind two checks that turn a confusing failure into a clear message.

pyvidfast compiles against the torch already installed (its headers, libraries, CMake config and CUDA version), as
flash-attention and torchcodec do, so it is built without build isolation (`pip install --no-build-isolation .`):
an isolated build environment holds no torch, or would fetch a second one (about 5 GB) that need not match the
torch the extension then runs with. Without isolation pip installs no build tools, so they are checked here.
"""

import functools
import importlib.util

BUILD_TOOLS = "pip install 'scikit-build-core>=0.10' 'cmake>=3.30' ninja"

if importlib.util.find_spec("scikit_build_core") is None:
    raise ImportError(
        "pyvidfast builds with scikit-build-core, CMake and Ninja, which pip does not install without build "
        f"isolation. Install them first:\n    {BUILD_TOOLS}\n    pip install --no-build-isolation .")

from scikit_build_core import build as _scikit_build  # noqa: E402
from scikit_build_core.build import build_sdist, get_requires_for_build_sdist  # noqa: E402,F401


def _require_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError(
            "pyvidfast compiles against the torch of the environment it is installed into, and this build cannot "
            "see one: torch is not installed, or pip isolated the build (its default). Install torch, then the build "
            f"tools, and build without isolation:\n    {BUILD_TOOLS}\n    pip install --no-build-isolation .\n"
            "(see docs/install.md)")


def _needs_torch(hook):
    """scikit-build-core's hook, after checking that the build sees torch (source distributions need none)."""
    @functools.wraps(hook)
    def checked(*args, **kwargs):
        _require_torch()
        return hook(*args, **kwargs)

    return checked


get_requires_for_build_wheel = _needs_torch(_scikit_build.get_requires_for_build_wheel)
prepare_metadata_for_build_wheel = _needs_torch(_scikit_build.prepare_metadata_for_build_wheel)
build_wheel = _needs_torch(_scikit_build.build_wheel)
get_requires_for_build_editable = _needs_torch(_scikit_build.get_requires_for_build_editable)
prepare_metadata_for_build_editable = _needs_torch(_scikit_build.prepare_metadata_for_build_editable)
build_editable = _needs_torch(_scikit_build.build_editable)
