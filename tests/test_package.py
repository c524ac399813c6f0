"""The package as a user meets it: the library loads, reports how it was built, and the CLI and demo work."""

import subprocess
import sys
from pathlib import Path

import torch

import pyvidfast
from pyvidfast import demo, samples

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_matches_the_dispatcher():
    info = pyvidfast.build_info()
    dump = torch._C._dispatch_dump("vidfast::rlt_tokenize")
    assert "CPU: registered" in dump
    assert ("CUDA: registered" in dump) == info["cuda_kernels"]
    assert bool(info["cuda_archs"]) == info["cuda_kernels"]
    assert info["torch"] == torch.__version__.split("+")[0]


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyvidfast", "info"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "CUDA kernels built: " in out and "GPU present: " in out and f"torch {torch.__version__}" in out


def test_sample_clips_are_checked(sample_clips):
    for name, path in sample_clips.items():
        assert path.stat().st_size > 100_000
        samples.check(name)


def test_demo_writes_png(tmp_path, capsys):
    class Args:
        clip, out, threshold = "balle-jbart.mp4", str(tmp_path), 0.1
        model, checkpoint, repeats = "videomae_vit_small_patch16_224", None, 1

    demo.main(Args)
    printed = capsys.readouterr().out
    assert "tokens kept:" in printed and "rlt_tokenize:" in printed and "speed-up" in printed
    png = tmp_path / "rlt_balle-jbart.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_missing_clip(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="clip"):
        demo.load_clip(str(tmp_path / "missing.mp4"))
