"""Byte input: VideoReader(bytes | bytearray | memoryview | binary file object) returns the same frames as the file
opened by its path, on every sample clip, with seeking and GOP-parallel decoders; bad objects fail clearly."""

import io
import random
import shutil
import tarfile
import threading

import pytest
import torch

import pyvidfast
from pyvidfast.io import VideoReader

from conftest import rss_mb
from test_video_reader import reader_cycles

pytestmark = [
    pytest.mark.skipif(not pyvidfast.build_info()["video_reader"], reason="pyvidfast was built without the reader"),
]


class CountingFile(io.RawIOBase):
    """A binary file object over bytes that counts its reads and the threads they come from (no readinto
    fast path from io.BytesIO: the reader must work with what `read`/`readinto` give)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.reads, self.threads = data, 0, 0, set()

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        self.reads += 1
        self.threads.add(threading.get_ident())
        chunk = self.data[self.pos:self.pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def sources(data: bytes):
    yield "bytes", data
    yield "bytearray", bytearray(data)
    yield "memoryview", memoryview(data)
    yield "BytesIO", io.BytesIO(data)
    yield "file object", CountingFile(data)


def test_byte_input_equals_path_on_sample_clips(sample_clips):
    rng = random.Random(0)
    for name, path in sample_clips.items():
        data = path.read_bytes()
        with VideoReader(path, threads=2) as by_path:
            n = len(by_path)
            idx = sorted(rng.sample(range(n), 6)) + [n - 1, 0]
            late = [k + 1 for k in by_path._reader._seek_frames()[-2:]]  # two GOPs: parallel decoders
            want, want_late = by_path.get_frames(idx), by_path.get_frames(late)
            meta = by_path.metadata
        for kind, source in sources(data):
            with VideoReader(source, threads=2) as r:
                assert r.metadata == meta, (name, kind)
                assert r.path is None and ("<bytes>" in repr(r) or "<file object>" in repr(r))
                assert torch.equal(r.get_frames(idx), want), (name, kind)
                assert torch.equal(r.get_frames(late), want_late), (name, kind)
            if kind == "file object":
                assert source.reads > 0


@pytest.mark.usefixtures("two_threads")
def test_file_object_read_from_several_decoders(sample_clips):
    # GOP-parallel decoders each read the one file object (through ctypes callbacks taking the GIL, one at a
    # time): frames stay exact.
    path = sample_clips["vtest.avi"]  # seek points every 250 frames: two decoders
    f = CountingFile(path.read_bytes())
    with VideoReader(path, threads=2) as by_path, VideoReader(f, threads=2) as r:
        idx = [5, 255, 505, 700]
        assert torch.equal(r.get_frames(idx), by_path.get_frames(idx))
        assert r._reader._decoders_used() == 2


def test_tar_member(tmp_path, sample_clips):
    # Datasets in tar shards: a member's file object, no temporary file.
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(sample_clips["bikes.mp4"], arcname="000/clip.mp4")
    with tarfile.open(shard) as tar, VideoReader(sample_clips["bikes.mp4"]) as by_path:
        with VideoReader(tar.extractfile("000/clip.mp4")) as r:
            assert torch.equal(r.get_frames([3, 100, 249]), by_path.get_frames([3, 100, 249]))


def test_bad_byte_input(tmp_path, sample_clips):
    with pytest.raises(ValueError, match="source: the bytes are empty"):
        VideoReader(b"")
    with pytest.raises(ValueError, match="source: cannot open <bytes>"):
        VideoReader(b"this is not a video" * 100)
    with pytest.raises(TypeError, match="source: expected a path, bytes"):
        VideoReader(12345)
    with pytest.raises(ValueError, match="contiguous"):
        VideoReader(memoryview(sample_clips["bikes.mp4"].read_bytes())[::2])
    text = tmp_path / "clip.txt"
    text.write_text("not binary")
    with open(text) as f, pytest.raises(TypeError, match="binary file object"):
        VideoReader(f)
    f = open(sample_clips["bikes.mp4"], "rb")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        VideoReader(f)

    class Unseekable(CountingFile):
        def seekable(self):
            return False

    with pytest.raises(ValueError, match="seekable"):
        VideoReader(Unseekable(b"x" * 100))
    # A file object whose read fails: its exception comes back, chained.
    data = sample_clips["bikes.mp4"].read_bytes()

    class Failing(CountingFile):
        fail = False

        def readinto(self, buffer):
            if self.fail:
                raise PermissionError("disk went away")
            return super().readinto(buffer)

    failing = Failing(data)
    with VideoReader(failing) as r:
        failing.fail = True
        with pytest.raises(OSError, match="disk went away"):
            r.get_frames([200])
    # A bytearray read by a reader cannot be resized under it.
    buffer = bytearray(data)
    with VideoReader(buffer) as r:
        with pytest.raises(BufferError):
            buffer.extend(b"more")
        assert r.get_frames([0]).shape == (1, 272, 640, 3)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")
def test_byte_input_of_other_containers(tmp_path, sample_clips):
    # Containers read through the AVIO callbacks seek differently (MPEG-TS by packets, Matroska by cues).
    import subprocess

    for suffix in (".ts", ".mkv", ".avi"):
        path = tmp_path / ("clip" + suffix)
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(sample_clips["bikes.mp4"]),
                        "-t", "3", "-c", "copy", str(path)], check=True, capture_output=True)
        with VideoReader(path) as by_path, VideoReader(path.read_bytes()) as r:
            idx = [70, 3, 31, len(r) - 1]
            assert len(r) == len(by_path)
            assert torch.equal(r.get_frames(idx), by_path.get_frames(idx)), suffix


def test_memory_does_not_grow_with_file_objects(sample_clips):
    # The file object kind of tests/test_video_reader.py's cycles by path and from bytes (there): its ctypes
    # callbacks and AVIO context are made and freed on each open/close. 25 cycles per clip after 5 to warm up.
    for name, path in sample_clips.items():
        source = io.BytesIO(path.read_bytes())
        reader_cycles(source, 5)
        before = rss_mb()
        reader_cycles(source, 25)
        assert rss_mb() - before < 5, (name, rss_mb() - before)
