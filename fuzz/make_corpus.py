"""Seed corpus for the reader's fuzz target: small videos of many containers and codecs made by the ffmpeg CLI,
plus structure-aware mutations of the MP4 sample tables the reader parses itself (stsz, stco/co64, stss, ctts,
stts, elst): counts that lie, offsets past the end, zero sizes, sums that overflow.

    python fuzz/make_corpus.py OUT_DIR          # (make fuzz runs it)

Also imported by tests/test_fuzz_regressions.py for `mp4_mutations` (the suite replays the mutations of a tiny
MP4 it makes).
"""

import struct
import subprocess
import sys
from pathlib import Path

SOURCE = ["-f", "lavfi", "-i", "testsrc2=size={size}:rate=25:duration={seconds}"]

# name: (output file suffix, ffmpeg output arguments, frame size, seconds)
SEEDS = {
    "h264_bframes.mp4": (["-c:v", "libx264", "-bf", "3", "-g", "6", "-pix_fmt", "yuv420p"], "64x48", 0.5),
    "h264_edit_list.mp4": (["-c:v", "libx264", "-bf", "2", "-g", "5", "-pix_fmt", "yuv420p", "-ss", "0.12"],
                           "48x32", 0.5),
    "h264_fragmented.mp4": (["-c:v", "libx264", "-g", "4", "-pix_fmt", "yuv420p", "-movflags",
                             "frag_keyframe+empty_moov"], "48x32", 0.4),
    "h264_co64.mov": (["-c:v", "libx264", "-bf", "1", "-g", "4", "-pix_fmt", "yuv420p"], "48x32", 0.3),
    "h264_422_10bit.mp4": (["-c:v", "libx264", "-pix_fmt", "yuv422p10le", "-g", "4"], "34x18", 0.3),
    "h264_444_odd.mp4": (["-c:v", "libx264", "-pix_fmt", "yuv444p", "-g", "3"], "35x19", 0.2),
    "hevc.mp4": (["-c:v", "libx265", "-x265-params", "log-level=none:bframes=2:keyint=5", "-pix_fmt", "yuv420p"],
                 "64x48", 0.3),
    "h264_raw.h264": (["-c:v", "libx264", "-bf", "2", "-g", "4", "-pix_fmt", "yuv420p", "-f", "h264"], "48x32", 0.3),
    "hevc_raw.hevc": (["-c:v", "libx265", "-x265-params", "log-level=none:keyint=4", "-f", "hevc"], "64x48", 0.2),
    "vp8.webm": (["-c:v", "libvpx", "-g", "4", "-b:v", "100k"], "48x32", 0.3),
    "vp9.mkv": (["-c:v", "libvpx-vp9", "-g", "4", "-b:v", "100k", "-pix_fmt", "yuv444p"], "48x32", 0.3),
    "av1.webm": (["-c:v", "libaom-av1", "-cpu-used", "8", "-g", "4", "-b:v", "50k"], "48x32", 0.2),
    "mpeg4.avi": (["-c:v", "mpeg4", "-bf", "2", "-g", "5"], "48x32", 0.4),
    "mjpeg.avi": (["-c:v", "mjpeg", "-pix_fmt", "yuvj422p"], "33x17", 0.2),
    "mpegts.ts": (["-c:v", "libx264", "-bf", "2", "-g", "5", "-pix_fmt", "yuv420p", "-f", "mpegts"], "48x32", 0.3),
    "mpeg2.mpg": (["-c:v", "mpeg2video", "-bf", "2", "-g", "5", "-f", "vob"], "48x33", 0.4),
    "theora.ogv": (["-c:v", "libtheora", "-g", "4"], "50x30", 0.3),
    "flv.flv": (["-c:v", "flv", "-g", "4"], "48x32", 0.3),
    "ffv1_odd.mkv": (["-c:v", "ffv1", "-pix_fmt", "yuv420p"], "17x9", 0.12),
    "prores.mov": (["-c:v", "prores_ks", "-profile:v", "0"], "32x16", 0.08),
}


def make_seed(name: str, out: Path) -> Path:
    args, size, seconds = SEEDS[name]
    source = [s.format(size=size, seconds=seconds) for s in SOURCE]
    if name == "h264_co64.mov":  # a 64-bit chunk offset table
        args = [*args, "-movflags", "+faststart", "-write_tmcd", "0"]
    path = out / name
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *source, *args, str(path)], check=True)
    return path


# ---- MP4 boxes ---------------------------------------------------------------------------------------------

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
TABLES = {b"stsz", b"stco", b"co64", b"stss", b"ctts", b"stts", b"elst", b"stsc"}


def boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, box start, payload start, box end) of every box under [start, end), depth first."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[at + 8:at + 16])[0]
            header = 16
        elif size == 0:
            size = end - at
        if size < header or at + size > end:
            return
        yield kind, at, at + header, at + size
        if kind in CONTAINERS:
            yield from boxes(data, at + header, at + size)
        at += size


def _put32(data: bytearray, at: int, value: int) -> None:
    struct.pack_into(">I", data, at, value & 0xFFFFFFFF)


def mp4_mutations(data: bytes):
    """(label, mutated file) pairs: each changes one field of one sample table (full-box header of 4 bytes, then
    an entry count at payload + 4, or for stsz the constant size at + 4 and the count at + 8)."""
    for kind, box_at, payload, end in boxes(data):
        if kind not in TABLES:
            continue
        name = kind.decode()
        count_at = payload + 8 if kind == b"stsz" else payload + 4
        first_entry = count_at + 4
        if first_entry > end:
            continue
        count = struct.unpack(">I", data[count_at:count_at + 4])[0]
        for label, value in [("count_zero", 0), ("count_plus_one", count + 1), ("count_max", 0xFFFFFFFF),
                             ("count_half", count // 2), ("count_2_31", 1 << 31)]:
            m = bytearray(data)
            _put32(m, count_at, value)
            yield f"{name}_{label}", bytes(m)
        m = bytearray(data)  # box size that runs past its parent
        _put32(m, box_at, end - box_at + 64)
        yield f"{name}_box_too_long", bytes(m)
        m = bytearray(data)  # box size smaller than its header
        _put32(m, box_at, 4)
        yield f"{name}_box_size_4", bytes(m)
        if first_entry + 4 > end:
            continue
        if kind == b"stsz":
            for label, value in [("constant_huge", 0xFFFFFFF0), ("constant_one", 1)]:
                m = bytearray(data)
                _put32(m, payload + 4, value)
                yield f"stsz_{label}", bytes(m)
            for label, value in [("entry_zero", 0), ("entry_huge", 0x7FFFFFFF)]:
                m = bytearray(data)
                _put32(m, first_entry, value)
                yield f"stsz_{label}", bytes(m)
        elif kind in (b"stco", b"co64"):
            wide = kind == b"co64"
            for label, value in [("offset_past_end", len(data) + 1000), ("offset_zero", 0),
                                 ("offset_max", (1 << 64) - 1 if wide else 0xFFFFFFFF)]:
                m = bytearray(data)
                struct.pack_into(">Q" if wide else ">I", m, first_entry, value)
                yield f"{name}_{label}", bytes(m)
        elif kind in (b"stts", b"ctts", b"stsc"):
            for label, field, value in [("sample_count_max", 0, 0xFFFFFFFF), ("delta_max", 4, 0xFFFFFFFF),
                                        ("delta_min_int32", 4, 0x80000000), ("sample_count_zero", 0, 0)]:
                if first_entry + field + 4 <= end:
                    m = bytearray(data)
                    _put32(m, first_entry + field, value)
                    yield f"{name}_{label}", bytes(m)
        elif kind == b"stss":
            for label, value in [("sync_zero", 0), ("sync_past_end", 0xFFFFFFFF)]:
                m = bytearray(data)
                _put32(m, first_entry, value)
                yield f"stss_{label}", bytes(m)
        elif kind == b"elst":
            version = data[payload]
            width = 8 if version == 1 else 4
            for label, field, value in [("duration_max", 0, (1 << (8 * width)) - 1),
                                        ("media_time_max", width, (1 << (8 * width - 1)) - 1),
                                        ("media_time_negative", width, (1 << (8 * width)) - 2)]:
                if first_entry + field + width <= end:
                    m = bytearray(data)
                    struct.pack_into(">Q" if width == 8 else ">I", m, first_entry + field, value)
                    yield f"elst_{label}", bytes(m)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    made = [make_seed(name, out) for name in SEEDS]
    mutated = 0
    for path in made:
        if path.suffix in (".mp4", ".mov"):
            for label, data in mp4_mutations(path.read_bytes()):
                (out / f"{path.stem}__{label}{path.suffix}").write_bytes(data)
                mutated += 1
    print(f"corpus: {len(made)} ffmpeg seeds + {mutated} MP4 sample-table mutations in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
