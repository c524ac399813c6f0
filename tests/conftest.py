import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyvidfast  # noqa: F401  (loads the op library)
from pyvidfast import samples

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and pyvidfast.build_info()["cuda_kernels"]),
    reason="needs a CUDA device and a build with CUDA kernels",
)
# One test body for every device: @pytest.mark.parametrize("device", DEVICES) (cuda skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]


@pytest.fixture(scope="session")
def sample_clips():
    """Paths of the real sample clips (fetched once into the cache)."""
    return {name: samples.sample_path(name) for name in samples.CLIPS}


@pytest.fixture(scope="session")
def video_list(tmp_path_factory, sample_clips):
    """A list file of short real clips for the training scripts: 16 frames of each sample clip at 96x72,
    re-encoded (MPEG-4), listed twice (label = the clip's place in name order)."""
    import av

    from pyvidfast.io import decode_frames

    folder = tmp_path_factory.mktemp("clips")
    lines = []
    for label, (name, path) in enumerate(sorted(sample_clips.items())):
        frames = decode_frames(path, 16, start=0, stride=2, size=(72, 96)).numpy()
        out = folder / (Path(name).stem + ".mp4")
        with av.open(str(out), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        lines.append(f"{out.name} {label}")
    (folder / "list.txt").write_text("\n".join(lines * 2) + "\n")
    return folder / "list.txt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


has_vector_kernels = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
requires_vector_kernels = pytest.mark.skipif(not has_vector_kernels, reason="needs AVX2 (x86 vector kernels)")


def run_portable(tmp_path, code, inputs, capability="default"):
    """Runs `code` in a fresh process where ATEN_CPU_CAPABILITY=`capability` selects other CPU kernels (default:
    the portable ones, no vector paths and no oneDNN micro-kernels; avx2: the AVX2 ones); the code reads `inputs`
    (saved with torch.save) and sets `result`, which is returned. Tests compare it with the same computation in this
    process, which uses the widest vector kernels."""
    tmp_path = tmp_path / capability
    tmp_path.mkdir(exist_ok=True)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import torch, pyvidfast\n"
        "from pyvidfast.ops import *\n"
        f"assert torch.backends.cpu.get_cpu_capability() == {capability.upper()!r}\n"
        f"inputs = torch.load(r'{tmp_path / 'inputs.pt'}', weights_only=True)\n"
        f"{code}\n"
        f"torch.save(result, r'{tmp_path / 'result.pt'}')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    return torch.load(tmp_path / "result.pt", weights_only=True)


def rss_mb() -> float:
    """The process's resident set now (not its peak), for the tests that check memory stays flat."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.fixture
def two_threads():
    """For the tests that count GOP-parallel decoders: the reader runs at most torch's thread count of them, which
    OMP_NUM_THREADS=1 (or a 1-core machine) makes 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)
