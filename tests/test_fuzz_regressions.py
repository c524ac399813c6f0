"""The reader on hostile files: every file in tests/data/fuzz/ (inputs the fuzzer of `make fuzz` found, each fixed
in the reader, and seeds of many containers), and the structure-aware mutations of fuzz/make_corpus.py of a tiny
MP4 (sample tables whose counts lie, offsets past the end, zero sizes, overflowing sums). Each file either gives
frames or raises a clear error (ValueError / RuntimeError naming the problem); none may crash, hang or read out of
bounds (`make sanitize` runs this file under ASan + UBSan). Each is read by path and from bytes (the reader's
memory input, which the libFuzzer target's memfd path does not reach), with the same outcome."""

import importlib.util
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import pyvidfast
from pyvidfast.io import VideoReader

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "fuzz"

pytestmark = pytest.mark.skipif(not pyvidfast.build_info()["video_reader"], reason="built without the reader")


def load_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "fuzz" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_or_raise_clearly(path, from_bytes=False):
    """Opens `path` (or its bytes) and decodes its first, middle and last frames; returns the frame count, or the
    error raised. Anything but ValueError/RuntimeError (or a crash) fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a scan that stops early warns; that is a clear answer too
            with VideoReader(path.read_bytes() if from_bytes else path, threads=1) as r:
                n = len(r)
                if n:
                    frames = r.get_frames(sorted({0, n // 2, n - 1}), size=(16, 16))
                    assert frames.shape == (len({0, n // 2, n - 1}), 16, 16, 3) and frames.dtype == torch.uint8
                return n
    except (ValueError, RuntimeError) as e:
        assert str(e), f"{path.name}: an error without a message"
        return e


def outcome(path):
    """The frame count or error type of `path`, the same by path and from bytes."""
    by_path, by_bytes = (read_or_raise_clearly(path, from_bytes) for from_bytes in (False, True))
    kinds = [type(x).__name__ if isinstance(x, Exception) else x for x in (by_path, by_bytes)]
    assert kinds[0] == kinds[1], f"{path.name}: {by_path!r} by path, {by_bytes!r} from bytes"
    return by_path


def regression_files():
    return sorted(p for p in DATA.iterdir() if p.is_file() and p.name != "README.md") if DATA.is_dir() else []


@pytest.mark.parametrize("path", regression_files(), ids=lambda p: p.name)
def test_regression_file(path):
    outcome(path)


@pytest.fixture(scope="module")
def tiny_mp4(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg CLI")
    path = tmp_path_factory.mktemp("fuzz") / "tiny.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=32x16:rate=25:duration=0.4", "-c:v", "libx264", "-bf", "2", "-g", "4",
                    "-pix_fmt", "yuv420p", "-ss", "0.08", str(path)], check=True, capture_output=True)
    return path


def test_mp4_sample_table_mutations(tiny_mp4, tmp_path):
    original = tiny_mp4.read_bytes()
    assert read_or_raise_clearly(tiny_mp4) == 8
    mutations = list(load_corpus_module().mp4_mutations(original))
    tables = {label.split("_")[0] for label, _ in mutations}
    assert {"stsz", "stco", "stss", "ctts", "stts", "elst"} <= tables, tables
    outcomes = {}
    for label, data in mutations:
        path = tmp_path / f"{label}.mp4"
        path.write_bytes(data)
        result = outcome(path)
        outcomes[label] = type(result).__name__ if isinstance(result, Exception) else result
    # Lies in the tables are caught (an error) or harmless (frames): at least the sizes that point past the file
    # must be refused rather than decoded.
    assert isinstance(outcomes["stsz_entry_huge"], str), outcomes
