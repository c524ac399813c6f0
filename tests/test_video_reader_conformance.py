"""Conformance: every frame the reader returns equals FFmpeg's own decode of the same file.

A corpus of small files (a few frames each) is made by the `ffmpeg` CLI once and cached under
~/.cache/pyvidfast/conformance/<key> (the key covers the corpus recipe and FFmpeg's version). Each file covers a
class of what real files do: containers (MP4/MOV, fragmented MP4, Matroska/WebM, AVI, MPEG-TS/PS, Ogg, FLV, raw
elementary streams), codecs, odd sizes, crop offsets, 4:2:0/4:2:2/4:4:4, full and limited range, BT.601/709 tags
and none, 10-bit. The reference is `ffmpeg -flags unaligned -i F -fps_mode passthrough -f rawvideo -pix_fmt
rgb24` (every decoded frame once; `-flags unaligned` crops exactly, see test_theora_crop_offset_is_exact).

- Native-size uint8 frames (libswscale, the same arithmetic as the CLI): mean abs difference < 0.5 per frame, and
  each frame is nearer its own reference than its neighbours' (no frame returned as its neighbour), in one
  sequential request and in random requests from fresh readers (seeking, parallel decoders).
- Float output (the fused kernel: exact BT.601/709 matrices, bilinear chroma) is not libswscale's arithmetic
  (libswscale's fast tables are 1-2 levels off the exact matrices): it is compared with a float64 reference
  computed from FFmpeg's decoded planes (`-pix_fmt <native>`) with the matrix and range the file is tagged with,
  mean < 0.5 levels for the 8-bit planar formats the kernel reads, < 0.75 for 10-bit (libswscale's exact mode
  to 8-bit planar RGB first, which rounds).
"""

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyvidfast
from pyvidfast.io import VideoReader
from pyvidfast.samples import cache_dir

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI to make the corpus"),
    pytest.mark.skipif(not pyvidfast.build_info()["video_reader"], reason="pyvidfast was built without the reader"),
]

SRC = "testsrc2=size={w}x{h}:rate=25:duration={d},format=rgb24"  # rgb24: no rounding of odd sizes by the source
X265 = ["-x265-params", "log-level=none:keyint=6:min-keyint=6:bframes=2"]

# name: (file suffix, width, height, frames, encoder arguments, matrix, range)
CORPUS = {
    "mp4_h264_bframes": (".mp4", 96, 64, 14, ["-c:v", "libx264", "-bf", "3", "-g", "6", "-keyint_min", "6",
                                              "-sc_threshold", "0", "-pix_fmt", "yuv420p"], "bt601", "limited"),
    "mov_h264_422_bt709": (".mov", 98, 58, 10, ["-c:v", "libx264", "-pix_fmt", "yuv422p", "-g", "4", "-colorspace",
                                                "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"],
                           "bt709", "limited"),
    "mp4_h264_444_odd": (".mp4", 75, 43, 8, ["-c:v", "libx264", "-pix_fmt", "yuv444p", "-bf", "2"], "bt601",
                         "limited"),
    "mp4_h264_full_bt601": (".mp4", 64, 48, 8, ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-color_range", "pc",
                                                "-colorspace", "smpte170m"], "bt601", "full"),
    "mp4_h264_crop_offset": (".mp4", 96, 64, 8, ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-x264-params",
                                                 "crop-rect=6,2,4,0"], "bt601", "limited"),
    "mp4_h264_10bit": (".mp4", 64, 48, 8, ["-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-colorspace", "bt709"],
                       "bt709", "limited"),
    "fmp4_h264": (".mp4", 96, 64, 12, ["-c:v", "libx264", "-bf", "2", "-g", "5", "-pix_fmt", "yuv420p",
                                       "-movflags", "frag_keyframe+empty_moov+default_base_moof"], "bt601",
                  "limited"),
    "mkv_vp8_odd": (".mkv", 97, 57, 8, ["-c:v", "libvpx", "-g", "4", "-pix_fmt", "yuv420p"], "bt601", "limited"),
    "webm_vp9_444_odd": (".webm", 75, 43, 8, ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                                              "-pix_fmt", "yuv444p"], "bt601", "limited"),
    "webm_vp9_10bit": (".webm", 64, 48, 8, ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                                            "-pix_fmt", "yuv420p10le"], "bt601", "limited"),
    "mkv_av1": (".mkv", 64, 48, 8, ["-c:v", "libaom-av1", "-cpu-used", "8", "-g", "4", "-pix_fmt", "yuv420p"],
                "bt601", "limited"),
    "avi_mjpeg_full_odd": (".avi", 99, 57, 8, ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj422p"], "bt601",
                           "full"),
    "ts_mpeg2_odd_height": (".ts", 96, 57, 12, ["-c:v", "mpeg2video", "-bf", "2", "-g", "6", "-pix_fmt",
                                                "yuv420p"], "bt601", "limited"),
    "ps_mpeg2_422_odd": (".mpg", 98, 57, 10, ["-c:v", "mpeg2video", "-g", "5", "-pix_fmt", "yuv422p"], "bt601",
                         "limited"),
    "ogg_theora_odd": (".ogv", 99, 57, 8, ["-c:v", "libtheora", "-g", "4", "-pix_fmt", "yuv420p"], "bt601",
                       "limited"),
    "ogg_theora_crop": (".ogv", 112, 80, 10, ["-c:v", "libtheora", "-g", "4", "-pix_fmt", "yuv420p"], "bt601",
                        "limited"),  # then its picture is cut to 100x67 at (5, 6) (theora_crop below)
    "flv_flv1": (".flv", 96, 64, 8, ["-c:v", "flv", "-g", "4"], "bt601", "limited"),
    "flv_h264": (".flv", 96, 64, 10, ["-c:v", "libx264", "-bf", "2", "-g", "5", "-pix_fmt", "yuv420p"], "bt601",
                 "limited"),
    "raw_h264": (".h264", 96, 64, 12, ["-c:v", "libx264", "-bf", "3", "-g", "6", "-pix_fmt", "yuv420p"], "bt601",
                 "limited"),
    "raw_hevc": (".hevc", 96, 64, 12, ["-c:v", "libx265", *X265, "-pix_fmt", "yuv420p"], "bt601", "limited"),
    "mkv_hevc_10bit": (".mkv", 64, 48, 8, ["-c:v", "libx265", *X265, "-pix_fmt", "yuv420p10le"], "bt601",
                       "limited"),
}
THEORA_CROP = (100, 67, 5, 6)  # picture width, height, x offset, y offset from the top (unaligned)
NEEDS_ENCODER = {"mkv_av1": "libaom-av1"}
KERNEL_FORMATS = {"yuv420p": (2, 2), "yuvj420p": (2, 2), "yuv422p": (2, 1), "yuvj422p": (2, 1), "yuv444p": (1, 1),
                  "yuvj444p": (1, 1)}


def ffmpeg(*args, **kw):
    return subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True,
                          capture_output=True, **kw)


def theora_crop(data: bytes, width: int, height: int, x: int, y_top: int) -> bytes:
    """The Ogg Theora file with its identification header's picture region set (and the page CRC redone)."""
    data = bytearray(data)
    at = 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS"
        segments = data[at + 26]
        body = at + 27 + segments
        end = body + sum(data[at + 27:body])
        if data[body:body + 7] == b"\x80theora":
            frame_height = int.from_bytes(data[body + 12:body + 14], "big") * 16
            data[body + 14:body + 17] = width.to_bytes(3, "big")
            data[body + 17:body + 20] = height.to_bytes(3, "big")
            data[body + 20] = x
            data[body + 21] = frame_height - height - y_top  # Theora counts the offset from the bottom
            data[at + 22:at + 26] = bytes(4)
            data[at + 22:at + 26] = ogg_crc(bytes(data[at:end])).to_bytes(4, "little")
            return bytes(data)
        at = end
    raise ValueError("no Theora identification header")


def ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def ffmpeg_version() -> str:
    return subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


@pytest.fixture(scope="session")
def corpus():
    """name -> path of each corpus file that this FFmpeg can make (made once, cached)."""
    recipe = repr((CORPUS, THEORA_CROP, SRC, ffmpeg_version())).encode()
    folder = cache_dir().parent / "conformance" / hashlib.sha256(recipe).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    files = {}
    for name, (suffix, w, h, frames, args, _, _) in CORPUS.items():
        if name in NEEDS_ENCODER and NEEDS_ENCODER[name] not in encoders:
            continue
        path = folder / (name + suffix)
        if not path.exists():
            part = folder / ("part-" + name + suffix)
            ffmpeg("-f", "lavfi", "-i", SRC.format(w=w, h=h, d=frames / 25), *args, part)
            if name == "ogg_theora_crop":
                part.write_bytes(theora_crop(part.read_bytes(), *THEORA_CROP))
            part.rename(path)  # atomic: a half-made file is never taken for a good one
        files[name] = path
    return files


def reference(path: Path, pix_fmt: str, width: int, height: int, plane_bytes: int | None = None) -> np.ndarray:
    """Every frame FFmpeg decodes, once each, as raw `pix_fmt` bytes: [N, bytes per frame]."""
    out = ffmpeg("-flags", "unaligned", "-i", path, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt",
                 pix_fmt, "-").stdout
    frame_bytes = plane_bytes or width * height * 3
    assert len(out) % frame_bytes == 0, (path.name, len(out), frame_bytes)
    return np.frombuffer(out, np.uint8).reshape(-1, frame_bytes)


def reference_rgb(path, width, height):
    return torch.from_numpy(reference(path, "rgb24", width, height).copy()).reshape(-1, height, width, 3)


def assert_same_frames(name, got, ref, indices, tol=0.5):
    """Each returned frame within `tol` levels of its reference on average, and nearer it than its neighbours."""
    for k, i in enumerate(indices):
        diffs = {j: (got[k].float() - ref[j].float()).abs().mean().item()
                 for j in range(max(0, i - 2), min(len(ref), i + 3))}
        assert diffs[i] < tol, (name, i, diffs)
        assert diffs[i] == min(diffs.values()), (name, i, diffs)  # (ties: identical neighbours)


@pytest.mark.parametrize("name", list(CORPUS))
def test_frames_equal_ffmpeg_decode(corpus, name):
    if name not in corpus:
        pytest.skip(f"this FFmpeg has no {NEEDS_ENCODER[name]} encoder")
    path = corpus[name]
    with VideoReader(path) as r:
        m = r.metadata
        ref = reference_rgb(path, m.width, m.height)
        assert len(r) == len(ref), (name, len(r), len(ref))
        everything = list(range(len(r)))
        assert_same_frames(name, r.get_frames(everything), ref, everything)
    rng = random.Random(name)
    for threads in (1, 2):  # fresh readers: seeks to keyframes, one decoder or GOP-parallel ones
        for _ in range(2):
            idx = sorted(rng.sample(everything, min(4, len(everything))), reverse=rng.random() < 0.5)
            with VideoReader(path, threads=threads) as r:
                assert_same_frames(name, r.get_frames(idx), ref, idx)


def float64_rgb(planes, sub, width, height, matrix, full_range):
    """RGB in 0..255, float64, of one frame's Y, U, V planes: chroma bilinear (centred samples, edges clamped)
    onto the picture, then the exact matrix of `matrix` and range."""
    y, u, v = planes
    sx, sy = sub
    chroma = [F.interpolate(p[None, None], size=(p.shape[0] * sy, p.shape[1] * sx), mode="bilinear",
                            align_corners=False)[0, 0, :height, :width] for p in (u, v)]
    kr, kb = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}[matrix]
    kg = 1 - kr - kb
    if full_range:
        a, b, c = y, chroma[0] - 128, chroma[1] - 128
    else:
        a, b, c = (y - 16) * 255 / 219, (chroma[0] - 128) * 255 / 224, (chroma[1] - 128) * 255 / 224
    rgb = torch.stack([a + 2 * (1 - kr) * c, a - 2 * (1 - kb) * kb / kg * b - 2 * (1 - kr) * kr / kg * c,
                       a + 2 * (1 - kb) * b], -1)
    return rgb.clamp(0, 255)


@pytest.mark.parametrize("name", list(CORPUS))
def test_fused_conversion_equals_float64_of_ffmpeg_planes(corpus, name):
    if name not in corpus:
        pytest.skip(f"this FFmpeg has no {NEEDS_ENCODER[name]} encoder")
    path = corpus[name]
    _, _, _, _, _, matrix, value_range = CORPUS[name]
    with VideoReader(path) as r:
        m = r.metadata
        idx = [0, len(r) // 2, len(r) - 1]
        got = r.get_frames(idx, dtype=torch.float32).double() * 255
    w, h = m.width, m.height
    sx, sy = KERNEL_FORMATS[m.pixel_format.removesuffix("10le")]
    cw, ch = -(-w // sx), -(-h // sy)
    ten_bit = m.pixel_format.endswith("10le")
    dtype = np.dtype("<u2" if ten_bit else "u1")
    raw = reference(path, m.pixel_format, w, h, (w * h + 2 * cw * ch) * dtype.itemsize).view(dtype)
    for k, i in enumerate(idx):
        frame = raw[i].astype(np.float64) / (4 if ten_bit else 1)  # 10-bit on the 8-bit scale
        planes = [torch.from_numpy(frame[:w * h].reshape(h, w)),
                  torch.from_numpy(frame[w * h:w * h + cw * ch].reshape(ch, cw)),
                  torch.from_numpy(frame[w * h + cw * ch:].reshape(ch, cw))]
        want = float64_rgb(planes, (sx, sy), w, h, matrix, value_range == "full")
        levels = (got[k] - want).abs().mean()
        # 10-bit: libswscale's exact mode to 8-bit planar RGB first (rounding: 0.25 level on average).
        assert levels < (0.75 if ten_bit else 0.5), (name, i, levels)


def test_theora_crop_offset_is_exact(corpus):
    # The Theora picture sits at x = 5 inside its coded frame. FFmpeg's default cropping rounds a left offset down
    # to keep planes aligned, so without AV_CODEC_FLAG_UNALIGNED the frames come out wider (shifted left, 7
    # levels off after being resized back to the header's width, as the reader once did).
    path = corpus["ogg_theora_crop"]
    width, height = THEORA_CROP[:2]
    with VideoReader(path) as r:
        assert (r.metadata.width, r.metadata.height) == (width, height)
        got = r.get_frames(range(len(r)))
    aligned = ffmpeg("-i", path, "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-").stdout
    assert len(aligned) > got.numel()  # FFmpeg's default: frames wider than the picture
    ref = reference_rgb(path, width, height)
    assert (got.float() - ref.float()).abs().mean() < 0.5

