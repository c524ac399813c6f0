"""Untrusted files: a file cannot make the reader open another path or a URL, and what a file declares is capped.

Crafted files made here: HLS playlists and ffconcat lists naming another local clip and a URL (served by a
local socket that counts connections), a playlist named .mp4, a pattern for an image sequence, a data: URI; a
YUV4MPEG file whose header claims a picture over the size limit; an MP4 sample over the packet size limit; an
MP4 sample table listing more packets than the packet count limit; a stream of packets that never give a frame."""

import shutil
import socket
import struct
import subprocess
import threading

import pytest
import torch

import pyvidfast
from pyvidfast.io import VideoReader

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI to make test videos"),
    pytest.mark.skipif(not pyvidfast.build_info()["video_reader"], reason="pyvidfast was built without the reader"),
]


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("untrusted") / "clip.ts"  # MPEG-TS: what HLS segments are
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=0.4", "-c:v", "mpeg2video", path)
    return path


@pytest.fixture
def listener():
    """A local TCP server counting the connections made to it (a URL inside a playlist must never be fetched)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/segment.ts", accepted
    stop.set()
    thread.join()
    server.close()


def hls(segment: str) -> str:
    return f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.4,\n{segment}\n#EXT-X-ENDLIST\n"


@pytest.mark.parametrize("kind", ["hls", "ffconcat"])
def test_playlists_are_refused(tmp_path, clip, listener, kind):
    url, accepted = listener
    shutil.copyfile(clip, tmp_path / "segment.ts")  # named relative to the playlist, as real ones are
    if kind == "hls":
        text_local, text_url, name, suffix = hls("segment.ts"), hls(url), "hls", ".m3u8"
    else:
        text_local, text_url = "ffconcat version 1.0\nfile 'segment.ts'\n", f"ffconcat version 1.0\nfile '{url}'\n"
        name, suffix = "concat", ".ffconcat"
    for text in (text_local, text_url):
        for path in (tmp_path / ("list" + suffix), tmp_path / "list.mp4"):  # also a playlist named like a video
            path.write_text(text)
            with pytest.raises(ValueError, match=r"path: .*(refused|cannot open)"):
                VideoReader(path)
            with open(path, "rb") as f:  # byte input: the same refusal
                with pytest.raises(ValueError, match=r"source: .*(refused|cannot open)"):
                    VideoReader(f)
    # Named by the caller, the demuxer may open local files (so the refusal above is what kept the segment
    # closed), and still no URL.
    path = tmp_path / ("local" + suffix)
    path.write_text(text_local)
    with VideoReader(path, allowed_formats=(name,)) as r, VideoReader(clip) as direct:
        assert len(r) == len(direct)
        assert torch.equal(r.get_frames([0, len(r) - 1]), direct.get_frames([0, len(direct) - 1]))
    path.write_text(text_url)
    with pytest.raises((ValueError, RuntimeError)):
        VideoReader(path, allowed_formats=(name,)).get_frames([0])
    assert accepted == [], "a URL named inside a playlist was fetched"


def test_refusal_message_names_the_format(tmp_path, clip):
    path = tmp_path / "video.mp4"
    path.write_text(f"ffconcat version 1.0\nfile '{clip}'\n")
    with pytest.raises(ValueError, match=r"'concat' file .* allowed_formats=\(\"concat\",\)"):
        VideoReader(path)


def test_image_sequences_and_uris_are_refused(tmp_path, clip):
    for k in range(3):
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=1:duration=1", "-frames:v", 1, tmp_path / f"img{k:03d}.png")
    with pytest.raises(FileNotFoundError):  # a pattern is not a file
        VideoReader(tmp_path / "img%03d.png")
    (tmp_path / "img%03d.png").write_bytes((tmp_path / "img000.png").read_bytes())  # a file spelling a pattern
    try:  # refused (the image2 demuxer), or read as the one picture it is: never as the sequence
        with VideoReader(tmp_path / "img%03d.png") as r:
            assert len(r) == 1
    except ValueError as e:
        assert "'image2' file" in str(e)
    for name in ("data:video/mp4;base64,AAAA", "http://127.0.0.1:9/x.mp4", f"concat:{clip}|{clip}"):
        with pytest.raises(FileNotFoundError):
            VideoReader(name)
    # A local file whose name spells a protocol is opened as that file only.
    spelled = tmp_path / "subfile,,start,0,end,0,,:clip.ts"
    shutil.copyfile(clip, spelled)
    with VideoReader(spelled) as r, VideoReader(clip) as direct:
        assert len(r) == len(direct)


@pytest.mark.parametrize("size", ["32x40000", "9000x9000"])
def test_declared_size_over_the_limit_fails(tmp_path, size):
    # A YUV4MPEG header declares the picture size as text: claim more than 16384 a side or 2^26 pixels.
    path = tmp_path / "small.y4m"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x16:rate=5:duration=0.4", "-pix_fmt", "yuv420p", path)
    data = path.read_bytes()
    assert data.startswith(b"YUV4MPEG2 W32 H16 ")
    w, h = size.split("x")
    big = tmp_path / "claims_huge.y4m"
    big.write_bytes(data.replace(b"W32 H16 ", f"W{w} H{h} ".encode(), 1))
    with pytest.raises(ValueError, match="over the reader's limit"):
        VideoReader(big)


def test_packet_over_the_limit_fails(tmp_path):
    # An MP4 whose last sample claims 2^28 + 16 bytes (over the 2^28 cap) and whose file holds them (a sparse
    # hole of zeros): a clear error naming the file, not a 256 MB picture sent to the decoder.
    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32:rate=25:duration=0.4", "-c:v", "mpeg4", "-movflags", "+faststart",
           path)
    data = bytearray(path.read_bytes())
    stsz = data.find(b"stsz")
    constant, count = struct.unpack(">II", data[stsz + 8:stsz + 16])
    assert constant == 0 and count == 10
    big = (1 << 28) + 16
    data[stsz + 16 + 4 * (count - 1):stsz + 20 + 4 * (count - 1)] = struct.pack(">I", big)
    lying = tmp_path / "huge_packet.mp4"
    with open(lying, "wb") as f:
        f.write(data)
        f.truncate(len(data) + big)
    with pytest.raises(ValueError, match=f"huge_packet.mp4' has a packet of {big} bytes, over the reader's limit"):
        with VideoReader(lying) as r:
            r.get_frames([count - 1])


def test_sample_table_over_the_packet_limit_fails(tmp_path):
    # An MP4 whose sample table lists 2^24 + 1 one-byte samples in one chunk (over the 2^24 packet cap), and whose
    # file holds them (a sparse hole): refused from the table with a clear error naming the file, before a scan
    # reads 16 M packets one by one. The tables are edited in place with the fuzz corpus's box walker.
    from test_fuzz_regressions import load_corpus_module

    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=16x16:rate=25:duration=0.2", "-c:v", "mpeg4", "-movflags", "+faststart",
           "-use_editlist", 0, path)
    data = bytearray(path.read_bytes())
    tables = {kind: payload for kind, _, payload, _ in load_corpus_module().boxes(bytes(data))}
    samples = (1 << 24) + 1
    struct.pack_into(">II", data, tables[b"stsz"] + 4, 1, samples)  # constant size 1, count
    delta = struct.unpack_from(">I", data, tables[b"stts"] + 12)[0]
    struct.pack_into(">III", data, tables[b"stts"] + 4, 1, samples, delta)  # one run of all samples
    struct.pack_into(">IIII", data, tables[b"stsc"] + 4, 1, 1, samples, 1)  # one chunk holds them all
    struct.pack_into(">I", data, tables[b"stco"] + 4, 1)  # that chunk: the first one, at the clip's first sample
    chunk = struct.unpack_from(">I", data, tables[b"stco"] + 8)[0]
    lying = tmp_path / "many_packets.mp4"
    with open(lying, "wb") as f:
        f.write(data)
        f.truncate(chunk + samples)
    with pytest.raises(ValueError, match=f"many_packets.mp4' lists {samples} video packets in its sample index, "
                                         f"more than the reader's limit of {1 << 24}"):
        VideoReader(lying)


def test_decode_without_progress_stops(tmp_path):
    # 4200 H.264 samples whose bytes are all zeros (the stream's parameter sets, in the sample description, are
    # intact): every packet fails to decode and none gives a frame. The read stops after 4096 such packets with an
    # error instead of going through the whole file.
    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=16x16:rate=25", "-frames:v", 4200, "-c:v", "libx264", "-preset",
           "ultrafast", "-g", 100000, "-pix_fmt", "yuv420p", path)
    data = bytearray(path.read_bytes())
    mdat = data.find(b"mdat")
    size = struct.unpack(">I", data[mdat - 4:mdat])[0]
    data[mdat + 4:mdat - 4 + size] = bytes(size - 8)
    zeroed = tmp_path / "zeroed.mp4"
    zeroed.write_bytes(data)
    with VideoReader(zeroed) as r:
        assert len(r) == 4200
        with pytest.raises(RuntimeError, match="stopped making progress: 4096 packets gave no frame"):
            r.get_frames([4199])
