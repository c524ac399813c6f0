"""pyvidfast.io: exact frames (vs a full sequential PyAV decode), fused conversion (vs a float64 reference),
metadata, sampling, bad input, memory, DataLoader workers, NVDEC."""

import os
import random
import shutil
import subprocess
import warnings

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from av.video.reformatter import Interpolation

import pyvidfast
from pyvidfast.io import VideoDataset, VideoReader, decode_frames, sampling
from conftest import DEVICES, requires_cuda_kernels, rss_mb

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI to make test videos"),
    pytest.mark.skipif(not pyvidfast.build_info()["video_reader"], reason="pyvidfast was built without the reader"),
]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# libswscale's accurate mode: the same colour arithmetic as the fused kernel (its default fast yuv420p -> rgb24
# tables are about 1.2 levels darker).
ACCURATE = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


@pytest.fixture(scope="session")
def made_videos(tmp_path_factory):
    """Small generated videos covering what real files do to a frame-exact reader."""
    d = tmp_path_factory.mktemp("videos")
    src = ["-f", "lavfi", "-i", "testsrc2=size={}:rate=25:duration={}"]
    v = {}
    v["bframes"] = d / "bframes.mp4"  # B-pyramid, closed GOPs of 12
    ffmpeg(*src[:3], src[3].format("160x96", 4), "-c:v", "libx264", "-bf", 3, "-g", 12, "-keyint_min", 12,
           "-sc_threshold", 0, "-pix_fmt", "yuv420p", v["bframes"])
    v["open_gop"] = d / "open_gop.mp4"  # keyframes followed by leading B-frames: not safe seek points
    ffmpeg(*src[:3], src[3].format("96x64", 3), "-c:v", "libx264", "-bf", 3, "-g", 12, "-x264-params",
           "open_gop=1", "-pix_fmt", "yuv420p", v["open_gop"])
    v["odd"] = d / "odd.mkv"  # odd size, 4:2:0 (ffv1 keeps odd sizes)
    ffmpeg(*src[:3], src[3].format("99x57", 1), "-c:v", "ffv1", "-pix_fmt", "yuv420p", v["odd"])
    v["odd444"] = d / "odd444.mp4"
    ffmpeg(*src[:3], src[3].format("75x43", 1), "-c:v", "libx264", "-pix_fmt", "yuv444p", v["odd444"])
    v["vfr"] = d / "vfr.mkv"  # variable frame rate: frame k shown at k^1.5 / 25 s
    ffmpeg(*src[:3], src[3].format("64x48", 2), "-vf", "setpts=N*sqrt(N)/25/TB", "-fps_mode", "vfr", "-c:v",
           "libx264", "-bf", 2, "-pix_fmt", "yuv420p", v["vfr"])
    v["offset"] = d / "offset.mp4"  # first timestamp at 7.5 s
    ffmpeg(*src[:3], src[3].format("64x48", 2), "-c:v", "libx264", "-bf", 2, "-g", 10, "-pix_fmt", "yuv420p",
           "-output_ts_offset", 7.5, v["offset"])
    v["mpeg4"] = d / "mpeg4.avi"  # MPEG-4 part 2 with B-frames in AVI (packed, no pts)
    ffmpeg(*src[:3], src[3].format("128x80", 2), "-c:v", "mpeg4", "-bf", 2, "-g", 15, v["mpeg4"])
    v["tiny"] = d / "tiny.mp4"  # for the memory and DataLoader tests
    ffmpeg(*src[:3], src[3].format("48x32", 0.4), "-c:v", "libx264", "-g", 5, "-pix_fmt", "yuv420p", v["tiny"])
    return v


def pyav_frames(path, interpolation=None):
    """Every frame of a full sequential decode, RGB uint8 [N, H, W, 3] (libswscale's default conversion)."""
    with av.open(str(path)) as c:
        frames = []
        for f in c.decode(video=0):
            f = f.reformat(format="rgb24", interpolation=interpolation) if interpolation else f
            frames.append(f.to_ndarray(format="rgb24"))
    return torch.from_numpy(np.stack(frames))


def pyav_keyframes(path):
    with av.open(str(path)) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]


def random_indices(n, count, rng):
    return [rng.randrange(n) for _ in range(count)] + [n - 1, 0, 0]


def resize_reference(rgb_uint8, size, mean=None, std=None):
    """float64: [T, H, W, 3] 0..255 -> antialiased bilinear resize -> [0, 1] (-> normalized)."""
    x = rgb_uint8.permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 255) / 255
    if mean is not None:
        x = (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std, dtype=torch.float64)[
            :, None, None]
    return x.permute(0, 2, 3, 1)


VIDEO_NAMES = ["bframes", "open_gop", "odd", "odd444", "vfr", "offset", "mpeg4"]


@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_generated_frames_equal_sequential_decode(made_videos, name):
    path = made_videos[name]
    ref = pyav_frames(path)
    with VideoReader(path, threads=2) as r:
        assert len(r) == ref.shape[0]
        assert (r.metadata.height, r.metadata.width) == tuple(ref.shape[1:3])
        rng = random.Random(1)
        for _ in range(3):  # successive requests: forward continuation, backward restarts, duplicates
            idx = random_indices(len(r), 7, rng)
            assert torch.equal(r.get_frames(idx), ref[idx]), idx
        everything = list(range(len(r)))
        assert torch.equal(r.get_frames(everything), ref)
        if name != "mpeg4":  # AVI gives B-frames no pts: keyframes are known by decode position only
            assert list(r.metadata.keyframes) == pyav_keyframes(path)


@pytest.mark.usefixtures("two_threads")
def test_real_clips_equal_sequential_decode(sample_clips):
    rng = random.Random(0)
    for name, path in sample_clips.items():
        ref = pyav_frames(path)
        with VideoReader(path) as r:
            assert len(r) == ref.shape[0], name
            idx = random_indices(len(r), 10, rng)
            got = r.get_frames(idx)
            # H.264 decodes bit-exactly across FFmpeg versions; PyAV bundles a newer FFmpeg than the system's,
            # whose msmpeg4 decoder differs in a handful of pixels.
            diff = (got.int() - ref[idx].int()).abs()
            assert diff.float().mean() < 0.01 and (name == "vtest.avi" or diff.max() == 0), name
        # Fresh readers seeking straight to late keyframes (cockatoo.mp4 needs the x264 SEI of its first packet):
        # one decoder (FFmpeg's threads or not), and GOP-parallel decoders that each start at a late keyframe.
        for threads in (1, 2):
            with VideoReader(path, threads=threads) as r:
                late = [r.metadata.keyframes[-1] + 1, len(r) - 1]
                got = r.get_frames(late)
                assert r._reader._decoders_used() == 1
            assert (got.int() - ref[late].int()).abs().float().mean() < 0.01, (name, threads)
        with VideoReader(path, threads=2) as r:
            late = [k + d for k in r._reader._seek_frames()[-2:] for d in (1, 2)]
            got = r.get_frames(late)
            assert r._reader._decoders_used() == 2
        assert (got.int() - ref[late].int()).abs().float().mean() < 0.01, name


@pytest.mark.usefixtures("two_threads")
def test_parallel_plan(made_videos, sample_clips):
    # Runs (targets sharing a seek point) are split over single-threaded decoders when the split is balanced;
    # H.264 (frame threads) takes one decoder with FFmpeg's threads when it is not; MS-MPEG-4 (no frame threads)
    # always splits. Frames stay exact either way.
    path = made_videos["bframes"]  # seek points every 12 frames
    ref = pyav_frames(path)
    for idx, decoders in (([5, 17], 2), ([3, 15, 27, 39], 2), ([11, 97], 1), ([50], 1)):
        with VideoReader(path, threads=2) as r:
            assert torch.equal(r.get_frames(idx), ref[idx])
            assert r._reader._decoders_used() == decoders, idx
    with VideoReader(path, threads=1) as r:
        r.get_frames([5, 17])
        assert r._reader._decoders_used() == 1
    with VideoReader(sample_clips["vtest.avi"], threads=2) as r:  # seek points 0, 250, 500, 750
        for idx in ([1, 251], [200, 251]):
            r.get_frames(idx)
            assert r._reader._decoders_used() == 2, idx


def yuv_planes(path, indices):
    """Decoded 8-bit Y, U, V planes of the frames at indices (a full sequential PyAV decode), float64."""
    wanted, out = set(indices), {}
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in wanted:
                planes = []
                for p in f.planes:
                    a = np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]
                    planes.append(torch.from_numpy(a.astype(np.float64)))
                out[i] = planes
    return [out[i] for i in indices]


def fused_reference(planes, size, mean=None, std=None):
    """float64 reference of the fused kernel: each plane resized (antialiased bilinear) to `size`, BT.601
    limited-range YUV -> RGB, clamp, [0, 1], normalize. [T, H, W, 3]."""
    frames = []
    for y, u, v in planes:
        p = [F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True)[0, 0] for x in (y, u, v)]
        kr, kb = 0.299, 0.114
        kg = 1 - kr - kb
        a, b, c = (p[0] - 16) * 255 / 219, (p[1] - 128) * 255 / 224, (p[2] - 128) * 255 / 224
        rgb = torch.stack([a + 2 * (1 - kr) * c, a - 2 * (1 - kb) * kb / kg * b - 2 * (1 - kr) * kr / kg * c,
                           a + 2 * (1 - kb) * b], -1).clamp(0, 255) / 255
        frames.append(rgb)
    x = torch.stack(frames)
    if mean is not None:
        x = (x - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["bikes", "cockatoo", "odd", "odd444", "bframes"])
def test_fused_conversion_matches_float64_reference(sample_clips, made_videos, case, device):
    # On CUDA, NVDEC's NV12 surfaces go through the CUDA kernel (streams NVDEC cannot take, such as H.264 4:4:4
    # and FFV1, are decoded on the CPU, converted there and copied): every output must match the same reference.
    path, size = {"bikes": (sample_clips["bikes.mp4"], (224, 224)),
                  "cockatoo": (sample_clips["cockatoo.mp4"], (97, 131)),
                  "odd": (made_videos["odd"], (40, 150)), "odd444": (made_videos["odd444"], (1, 1)),
                  "bframes": (made_videos["bframes"], (95, 161))}[case]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VideoReader: NVDEC cannot")
        r = VideoReader(path, device=device)
    with r:
        idx = [0, len(r) // 2, len(r) - 1]
        outputs = [r.get_frames(idx, size=size, dtype=torch.float32, mean=MEAN, std=STD),
                   r.get_frames(idx, size=size, dtype=torch.float32), r.get_frames(idx, size=size),
                   r.get_frames(idx, size=size, dtype=torch.bfloat16, layout="CTHW")]
    assert all(t.device.type == torch.device(device).type for t in outputs)
    f32, plain, u8, bf16 = (t.cpu() for t in outputs)
    planes = yuv_planes(path, idx)
    assert f32.shape == (3, *size, 3) and f32.dtype == torch.float32
    # Same arithmetic in float32 vs float64 (odd sizes: chroma planes cover a half pixel more in the reference).
    tol = 2e-3 if case != "odd444" else 1e-4
    assert (plain.double() - fused_reference(planes, size)).abs().mean() < tol
    torch.testing.assert_close(f32.double(), fused_reference(planes, size, MEAN, STD), atol=0.05, rtol=0)
    assert (plain * 255 - u8.float()).abs().max() <= 0.501
    assert bf16.shape == (3, 3, *size) and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), plain.permute(3, 0, 1, 2), atol=1 / 64, rtol=0)


def test_fused_conversion_matches_pyav_resized(sample_clips):
    """Real clips: PyAV's full decode (libswscale accurate RGB) resized in PyTorch, within 1 level on average."""
    for name, path in sample_clips.items():
        ref_rgb = pyav_frames(path, interpolation=ACCURATE)
        idx = [1, ref_rgb.shape[0] - 2]
        with VideoReader(path) as r:
            got = r.get_frames(idx, size=(224, 224), dtype=torch.float32)
        levels = (got.double() - resize_reference(ref_rgb[idx], (224, 224))).abs() * 255
        assert levels.mean() < 1.0, (name, levels.mean())


def test_layouts_and_request_order(made_videos):
    with VideoReader(made_videos["bframes"]) as r:
        idx = [40, 3, 40, 17, 3]
        thwc = r.get_frames(idx, size=(33, 47), dtype=torch.float32)
        cthw = r.get_frames(idx, size=(33, 47), dtype=torch.float32, layout="CTHW")
        assert cthw.is_contiguous() and torch.equal(cthw, thwc.permute(3, 0, 1, 2))
        single = torch.stack([r.get_frames([i], size=(33, 47), dtype=torch.float32)[0] for i in idx])
        assert torch.equal(single, thwc)
        assert r.get_frames([]).shape == (0, 96, 160, 3)
        assert r.get_frames(torch.tensor([[1, 2]])).shape == (2, 96, 160, 3)
        assert r[5].shape == (96, 160, 3) and r[2:8:3].shape == (2, 96, 160, 3)


def packet_table(reader):
    """What opening a file found, to compare the sample-index listing with the packet scan."""
    m = reader.metadata
    return (m, reader.timestamps().tolist(), reader._reader._seek_frames())


@pytest.fixture(scope="session")
def mp4_variants(tmp_path_factory, made_videos):
    """MP4/MOV files whose sample index the reader may use (or must refuse), beside the generated ones."""
    d = tmp_path_factory.mktemp("mp4")
    src = ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=3"]
    v = {}
    v["faststart"] = d / "faststart.mp4"  # moov before the media data
    ffmpeg("-i", made_videos["bframes"], "-c", "copy", "-movflags", "+faststart", v["faststart"])
    v["cut_edit_list"] = d / "cut_edit_list.mp4"  # edit list starting inside a GOP: leading packets discarded
    ffmpeg("-ss", 1.3, "-i", made_videos["bframes"], "-c", "copy", v["cut_edit_list"])
    v["vfr"] = d / "vfr.mp4"  # variable frame rate with B-frames
    ffmpeg(*src, "-vf", "setpts=N*sqrt(N)/25/TB", "-fps_mode", "vfr", "-c:v", "libx264", "-bf", 2,
           "-pix_fmt", "yuv420p", v["vfr"])
    v["hevc"] = d / "hevc.mov"  # HEVC in MOV with B-frames, open GOPs (CRA pictures are not IDR)
    ffmpeg(*src, "-c:v", "libx265", "-x265-params", "log-level=none:keyint=20:min-keyint=20:open-gop=1:bframes=3",
           "-pix_fmt", "yuv420p", v["hevc"])
    v["mpeg4"] = d / "mpeg4.mp4"  # MPEG-4 part 2 with B-frames (no IDR test)
    ffmpeg(*src, "-c:v", "mpeg4", "-bf", 2, "-g", 15, v["mpeg4"])
    v["no_bframes"] = d / "no_bframes.mp4"  # no 'ctts'
    ffmpeg(*src, "-c:v", "libx264", "-bf", 0, "-g", 10, "-pix_fmt", "yuv420p", v["no_bframes"])
    v["with_audio"] = d / "with_audio.mp4"  # audio track first: the video track is found by its track id
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=3", *src, "-map", "0:a", "-map", "1:v", "-c:a", "aac",
           "-c:v", "libx264", "-bf", 2, "-g", 15, "-pix_fmt", "yuv420p", v["with_audio"])
    v["fragmented"] = d / "fragmented.mp4"  # fragments: the index is built while reading; packets are read
    ffmpeg("-i", made_videos["bframes"], "-c", "copy", "-movflags", "frag_keyframe+empty_moov", v["fragmented"])
    return v


def test_sample_index_listing_equals_packet_scan(made_videos, mp4_variants, sample_clips):
    # Opening MP4/MOV files lists packets from the demuxer's sample index: frame count, pts order (timestamps),
    # keyframes, duration and the IDR-only seek points must equal what reading every packet finds.
    refused = {"fragmented"}
    files = {**{k: made_videos[k] for k in ("bframes", "open_gop", "odd444", "offset", "tiny")}, **mp4_variants,
             **{k: v for k, v in sample_clips.items() if k.endswith(".mp4")}}
    for name, path in files.items():
        with VideoReader(path) as fast, VideoReader(path, _read_all_packets=True) as slow:
            assert fast._reader._index_used() == (name not in refused), name
            assert not slow._reader._index_used()
            assert packet_table(fast) == packet_table(slow), name
    with VideoReader(sample_clips["bikes.mp4"]) as r:  # seek points: the IDR keyframes (all of this clip's)
        assert r._reader._seek_frames() == [0, 30, 76, 137, 187, 242]
    with VideoReader(mp4_variants["hevc"]) as r:  # CRA keyframes are listed, but only the IDR start is a seek point
        assert len(r.metadata.keyframes) > 1 and r._reader._seek_frames() == [0]


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", ["cut_edit_list", "vfr", "hevc", "mpeg4", "with_audio"])
def test_indexed_mp4_frames_equal_sequential_decode(mp4_variants, name):
    path = mp4_variants[name]
    ref = pyav_frames(path)
    with VideoReader(path, threads=2) as r:
        assert len(r) == ref.shape[0]
        idx = random_indices(len(r), 9, random.Random(2))
        assert torch.equal(r.get_frames(idx), ref[idx]), idx
        if name == "with_audio":  # the parallel decoders (no stream probing) find the video track too
            assert r._reader._decoders_used() == 2
        assert torch.equal(r.get_frames(list(range(len(r)))), ref)
        assert list(r.metadata.keyframes) == pyav_keyframes(path)


def test_metadata(made_videos, sample_clips):
    with VideoReader(made_videos["offset"]) as r:
        ts = r.timestamps()
        assert ts[0] == 0 and torch.allclose(ts[1:] - ts[:-1], torch.full((len(r) - 1,), 0.04, dtype=torch.float64))
        assert r.metadata.fps == pytest.approx(25) and r.metadata.duration == pytest.approx(2.0)
    with VideoReader(made_videos["vfr"]) as r:
        ts = r.timestamps()
        with av.open(str(made_videos["vfr"])) as c:
            times = [f.time for f in c.decode(video=0)]
        assert torch.allclose(ts, torch.tensor(times, dtype=torch.float64) - times[0])
        gaps = ts[1:] - ts[:-1]
        assert gaps.max() > 2 * gaps.min() > 0  # really variable
    with VideoReader(sample_clips["bikes.mp4"]) as r:
        m = r.metadata
        assert (m.num_frames, m.width, m.height, m.codec) == (250, 640, 272, "h264")
        assert m.keyframes == (0, 30, 76, 137, 187, 242) and m.decode_device == "cpu"


def test_sampling():
    g = torch.Generator().manual_seed(0)
    clip = sampling.dense(100, 16, 4, generator=g)
    assert len(clip) == 16 and all(b - a == 4 for a, b in zip(clip, clip[1:])) and clip[-1] < 100
    assert sampling.dense(10, 4, 4, start=0) == [0, 4, 8, 9]  # past the end: the last frame repeats
    views = sampling.dense_views(100, 8, 2, num_views=3)
    assert [v[0] for v in views] == [0, 42, 85] and views[-1][-1] == 99
    assert sampling.segments(80, 8) == [4, 14, 24, 34, 44, 54, 64, 74]
    seg = sampling.segments(80, 8, random=True, generator=g)
    assert all(10 * s <= i < 10 * (s + 1) for s, i in enumerate(seg))
    assert sampling.segments(3, 8) == sorted(sampling.segments(3, 8)) and max(sampling.segments(3, 8)) <= 2
    assert sampling.uniform(11, 3) == [0, 5, 10] and sampling.uniform(5, 1) == [2]
    ts = torch.arange(0, 250) / 25.0  # 10 s at 25 fps
    assert sampling.per_second(ts, 1.0) == [25 * k for k in range(10)]
    assert sampling.per_second(ts, 1.0, max_frames=4) == [0, 75, 150, 225]
    vfr = torch.tensor([0.0, 0.1, 1.5, 1.6, 3.2])
    assert sampling.per_second(vfr, 1.0) == [0, 1, 3]  # shown at t = 0, 1, 2 (and still at 3)
    with pytest.raises(ValueError, match="num_frames"):
        sampling.uniform(0, 4)


def test_build_without_reader_raises_clearly(monkeypatch, made_videos):
    # A library built without FFmpeg (VIDFAST_FFMPEG=OFF, or its development files missing) reports it in
    # build_info, and VideoReader says so at use.
    info = {**pyvidfast.build_info(), "video_reader": False}
    monkeypatch.setattr(pyvidfast, "build_info", lambda: info)
    with pytest.raises(RuntimeError, match="no frame reader.*VIDFAST_FFMPEG=OFF"):
        VideoReader(made_videos["bframes"])


def test_bad_input(tmp_path, made_videos):
    with pytest.raises(FileNotFoundError, match="path"):
        VideoReader(tmp_path / "missing.mp4")
    with pytest.raises(IsADirectoryError):
        VideoReader(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="path: cannot open"):
        VideoReader(empty)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    with pytest.raises(ValueError, match="path"):
        VideoReader(text)
    audio = tmp_path / "tone.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.2", audio)
    with pytest.raises(ValueError, match="no video stream"):
        VideoReader(audio)
    # Unsupported codec: an AVI whose fourcc names no decoder.
    avi = tmp_path / "unknown.avi"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=5:duration=1", "-c:v", "mpeg4", "-vtag", "XVID", avi)
    avi.write_bytes(avi.read_bytes().replace(b"XVID", b"QQQQ").replace(b"FMP4", b"QQQQ"))
    with pytest.raises((NotImplementedError, ValueError), match="decoder|codec|path"):
        VideoReader(avi).get_frames([0])

    with VideoReader(made_videos["bframes"]) as r:
        n = len(r)
        with pytest.raises(IndexError, match="indices"):
            r.get_frames([0, n])
        with pytest.raises(IndexError, match="indices"):
            r.get_frames([-1])
        for size in [(-5, 10), (0, 4), (10, 0)]:
            with pytest.raises(ValueError, match="size"):
                r.get_frames([0], size=size)
        with pytest.raises(ValueError, match="layout"):
            r.get_frames([0], layout="NCHW")
        with pytest.raises(TypeError, match="dtype"):
            r.get_frames([0], dtype=torch.float64)
        with pytest.raises(ValueError, match="mean/std"):
            r.get_frames([0], mean=MEAN, std=STD)  # uint8 cannot be normalized
        with pytest.raises(ValueError, match="std"):
            r.get_frames([0], dtype=torch.float32, mean=MEAN, std=(0.2, 0.0, 0.2))
        with pytest.raises(ValueError, match="mean/std"):
            r.get_frames([0], dtype=torch.float32, mean=MEAN)
    with pytest.raises(ValueError, match="threads"):
        VideoReader(made_videos["bframes"], threads=-1)
    closed = VideoReader(made_videos["bframes"])
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.get_frames([0])


def test_truncated_file(tmp_path, made_videos):
    # moov first, then the media data cut at 60 %: the scan finds fewer frames, the last ones may be broken.
    whole = tmp_path / "whole.mp4"
    ffmpeg("-i", made_videos["bframes"], "-c", "copy", "-movflags", "+faststart", whole)
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = VideoReader(cut)
    full = pyav_frames(whole)
    assert 0 < len(r) < full.shape[0]
    got = r.get_frames([0, 5, 1])
    assert torch.equal(got, full[[0, 5, 1]])
    # Frames the stream cannot deliver raise unless partial results are asked for.
    late = list(range(len(r) - 3, len(r)))
    try:
        got = r.get_frames(late)
    except RuntimeError as e:
        assert "partial=True" in str(e)
        with pytest.warns(UserWarning, match="could not be decoded"):
            part = r.get_frames([0] + late, partial=True)
        assert 1 <= part.shape[0] < 4 and torch.equal(part[0], full[0])
    else:  # the cut fell between pictures: what the scan counts must decode exactly
        assert torch.equal(got, full[late])
    # moov at the end and the file cut: not a readable video.
    plain = made_videos["bframes"].read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(plain[: len(plain) // 2])
    with pytest.raises(ValueError, match="path"):
        VideoReader(broken)


def test_memory_does_not_grow(made_videos):
    path = made_videos["tiny"]
    for _ in range(50):  # warm up allocators
        with VideoReader(path, threads=1) as r:
            r.get_frames([0, 7], size=(16, 16), dtype=torch.float32)
    before = rss_mb()
    for i in range(1000):
        with VideoReader(path, threads=1) as r:
            r.get_frames([i % len(r), len(r) - 1], size=(16, 16), dtype=torch.float32)
    assert rss_mb() - before < 20


def reader_cycles(source, cycles):
    """Open, decode the first frame and a keyframe (a seek), close."""
    for i in range(cycles):
        with VideoReader(source, threads=1) as r:
            keyframes = r.metadata.keyframes
            r.get_frames([0, keyframes[i % len(keyframes)]], size=(32, 32), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_memory_does_not_grow_on_sample_clips(sample_clips, kind):
    # Measured once over 1000 open/decode/close cycles per clip (docs/video_reader.md): growth < 5 MB. Here 25
    # cycles per clip after 5 to warm up allocators, with the same bound.
    for name, path in sample_clips.items():
        source = path if kind == "path" else path.read_bytes()
        reader_cycles(source, 5)
        before = rss_mb()
        reader_cycles(source, 25)
        assert rss_mb() - before < 5, (name, kind, rss_mb() - before)


def test_dataset_in_forked_workers(tmp_path, made_videos):
    lst = tmp_path / "train.txt"
    lst.write_text(f"{made_videos['bframes']} 3\n\n# comment\n{made_videos['offset']} 1\n"
                   f"{os.path.relpath(made_videos['vfr'], tmp_path)} 0\n")
    ds = VideoDataset(lst, sampler=lambda r: sampling.dense(len(r), 4, 2, start=0), size=(32, 32))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    (clips, labels), = list(loader)
    assert clips.shape == (3, 3, 4, 32, 32) and labels.tolist() == [3, 1, 0]
    with VideoReader(made_videos["offset"]) as r:
        direct = r.get_frames([0, 2, 4, 6], size=(32, 32), layout="CTHW", dtype=torch.float32, mean=MEAN, std=STD)
    assert torch.equal(clips[1], direct)
    views = VideoDataset(lst, sampler=lambda r: sampling.dense_views(len(r), 2, 1, 3), size=(8, 8))
    assert views[0][0].shape == (3, 3, 2, 8, 8)


def test_decode_frames_equals_sequential_decode(sample_clips):
    got = decode_frames(sample_clips["bikes.mp4"], 4, start=10, stride=5)
    assert torch.equal(got, pyav_frames(sample_clips["bikes.mp4"])[10:30:5])


@requires_cuda_kernels
def test_nvdec_444_falls_back_with_warning(sample_clips):
    with pytest.warns(UserWarning, match="NVDEC"):
        r = VideoReader(sample_clips["cockatoo.mp4"], device="cuda")
    assert r.metadata.decode_device == "cpu"
    out = r.get_frames([0, 10], size=(64, 64))
    assert out.is_cuda and torch.equal(out.cpu(), VideoReader(sample_clips["cockatoo.mp4"]).get_frames([0, 10],
                                                                                                       size=(64, 64)))
