"""Frame sampling benchmark: pyvidfast.io.VideoReader against PyAV (seek per frame, and one sequential pass),
decord and torchcodec, on the CPU. Every reader returns the same model-ready clip: float32 [T, 3, 224, 224]
normalized with ImageNet's mean/std; the peers' frames are resized (bilinear, antialiased) and normalized in
PyTorch. Each timed call opens the file, samples, converts and closes it, as a Dataset's __getitem__ does. The
readers take turns (one call each per round), so load from other jobs falls on all of them alike.

Clips: the real sample clips, and a 10-minute clip made by looping bikes.mp4 with the ffmpeg CLI (stream copy,
cached next to the samples). Cases: 16 frames uniform, 16 frames at stride 4 from a random start (the same start
for every reader), one frame per second.

    python -m bench.video_reader [--repeats 5] [--quick]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree's pyvidfast (make build puts _C.so there)
from bench.common import grouped_bar_chart, markdown_table, write_json  # noqa: E402

import pyvidfast  # noqa: E402,F401
from pyvidfast import samples  # noqa: E402
from pyvidfast.io import VideoReader, sampling  # noqa: E402

SIZE = (224, 224)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LONG_CLIP = "bikes_loop600.mp4"


def long_clip() -> Path:
    """bikes.mp4 looped to 10 minutes with the ffmpeg CLI (packets copied, so its GOPs are the real ones)."""
    path = samples.cache_dir() / LONG_CLIP
    if not path.exists():
        tmp = path.with_suffix(".part.mp4")
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i",
                        str(samples.sample_path("bikes.mp4")), "-t", "600", "-an", "-c", "copy", str(tmp)],
                       check=True)
        tmp.rename(path)
    return path


def to_model(frames_nchw_uint8: torch.Tensor) -> torch.Tensor:
    """The peers' shared tail: uint8 [T, 3, H, W] -> resized, [0, 1], normalized float32 [T, 3, 224, 224]."""
    x = F.interpolate(frames_nchw_uint8.float(), size=SIZE, mode="bilinear", antialias=True)
    x = x.clamp_(0, 255).div_(255)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def read_pyvidfast(path, indices):
    with VideoReader(path) as r:
        frames = r.get_frames(indices, size=SIZE, layout="THWC", dtype=torch.float32, mean=MEAN, std=STD)
    return frames.permute(0, 3, 1, 2)  # [T, 3, H, W] like the peers (a view)


def read_pyav_sequential(path, indices):
    import av

    wanted = {}
    for slot, i in enumerate(indices):
        wanted.setdefault(i, []).append(slot)
    out = [None] * len(indices)
    last = max(indices)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            if i in wanted:
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                for slot in wanted[i]:
                    out[slot] = rgb
            if i >= last:
                break
    return to_model(torch.stack(out).permute(0, 3, 1, 2))


def read_pyav_seek(path, indices, fps):
    """Seek to each frame's time (to the keyframe before it), then decode up to it: the usual PyAV recipe."""
    import av

    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        start = s.start_time or 0
        for i in indices:
            target = start + int(round(i / fps / s.time_base))
            c.seek(target, stream=s, backward=True, any_frame=False)
            for frame in c.decode(s):
                if frame.pts is not None and frame.pts >= target - 0.5 / fps / s.time_base:
                    out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                    break
    return to_model(torch.stack(out).permute(0, 3, 1, 2))


def read_decord(path, indices):
    import decord

    vr = decord.VideoReader(str(path), num_threads=0)
    frames = torch.from_numpy(vr.get_batch(indices).asnumpy())
    del vr
    return to_model(frames.permute(0, 3, 1, 2))


def read_torchcodec(path, indices):
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(str(path), num_ffmpeg_threads=0, seek_mode="exact", dimension_order="NCHW")
    return to_model(dec.get_frames_at(indices).data)


def cases(num_frames: int, fps: float, rng: torch.Generator) -> dict:
    return {
        "16 uniform": sampling.uniform(num_frames, 16),
        "16 at stride 4": sampling.dense(num_frames, 16, 4, generator=rng),
        "1 per second": [min(round(k * fps), num_frames - 1) for k in range(int(num_frames / fps))],
    }


def time_readers(readers: dict, repeats: int, warmup: bool) -> tuple[dict, dict]:
    """Median seconds of each reader over repeats, and each reader's result. Rounds run every reader once, in turn,
    so a burst of load from other jobs on the machine hits all readers alike rather than one."""
    results = {name: fn() for name, fn in readers.items()} if warmup else {}  # file cached, libraries loaded
    times = {name: [] for name in readers}
    for _ in range(repeats):
        for name, fn in readers.items():
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            results.setdefault(name, out)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (the 10-minute clip: 1)")
    parser.add_argument("--quick", action="store_true", help="real clips only, 3 repeats")
    args = parser.parse_args()
    clips = {name: samples.sample_path(name) for name in samples.CLIPS}
    if not args.quick:
        clips[LONG_CLIP + " (bikes.mp4 looped to 10 min)"] = long_clip()
    repeats = 3 if args.quick else args.repeats

    rows, results = [], []
    rng = torch.Generator().manual_seed(0)
    work = []
    for label, path in clips.items():
        with VideoReader(path) as r:
            n, fps = len(r), r.metadata.fps
        for case, indices in cases(n, fps, rng).items():
            work.append((label, path, n, fps, case, indices))
    for label, path, n, fps, case, indices in tqdm(work, desc="decode bench"):
        long = n > 5000
        readers = {
            "pyvidfast": lambda: read_pyvidfast(path, indices),
            "PyAV seek": lambda: read_pyav_seek(path, indices, fps),
            "PyAV sequential": lambda: read_pyav_sequential(path, indices),
            "decord": lambda: read_decord(path, indices),
            "torchcodec": lambda: read_torchcodec(path, indices),
        }
        # The 10-minute clip: one timed run per reader (its warm-up is the long clip's creation and scan).
        seconds, got = time_readers(readers, 1 if long else repeats, warmup=not long)
        fps_of, ref = {}, got["pyvidfast"]
        for name in readers:
            # Same frames: resized pixels agree to about a level (libswscale's RGB vs the fused YUV path).
            err = float((got[name] - ref).abs().mean() * 0.226 * 255)
            fps_of[name] = len(indices) / seconds[name]
            results.append({"clip": label, "case": case, "frames": len(indices), "reader": name,
                            "median_s": seconds[name], "frames_per_s": fps_of[name], "mean_abs_diff_levels": err})
        peers = {k: v for k, v in fps_of.items() if k != "pyvidfast"}
        best = max(peers, key=peers.get)
        rows.append([label, case, len(indices), fps_of["pyvidfast"], fps_of["PyAV seek"], fps_of["PyAV sequential"],
                     fps_of["decord"], fps_of["torchcodec"], f"{fps_of['pyvidfast'] / peers[best]:.2f}x ({best})"])

    headers = ["clip", "case", "frames", "pyvidfast", "PyAV seek", "PyAV seq", "decord", "torchcodec",
               "vs fastest peer"]
    table = markdown_table(headers, rows)
    ratios = [float(r[-1].split("x")[0]) for r in rows]
    print(table)
    print(f"\nframes/s (higher is better), median of {repeats} runs (1 on the 10-minute clip); "
          f"torch threads {torch.get_num_threads()}; median ratio to the fastest peer {statistics.median(ratios):.2f}x,"
          f" worst {min(ratios):.2f}x")
    path = write_json("video_reader", {"size": SIZE, "repeats": repeats, "results": results, "table": table,
                                       "median_ratio_vs_fastest_peer": statistics.median(ratios),
                                       "worst_ratio_vs_fastest_peer": min(ratios)})
    print(f"wrote {path}")
    print(f"wrote {plot(results, path.with_suffix('.png'))}")


def plot(results: list[dict], out: Path) -> Path:
    """Bar chart: frames/s of each reader per clip and case (log scale)."""
    cases = list(dict.fromkeys((r["clip"].split(" ")[0], r["case"]) for r in results))
    readers = list(dict.fromkeys(r["reader"] for r in results))
    fps = {(r["clip"].split(" ")[0], r["case"], r["reader"]): r["frames_per_s"] for r in results}
    series = {reader: [fps[c + (reader,)] for c in cases] for reader in readers}
    return grouped_bar_chart([f"{clip}\n{case}" for clip, case in cases], series, "frames/s (224x224, normalized)",
                             "Frame sampling on the CPU, one reader per call", out)


if __name__ == "__main__":
    main()
