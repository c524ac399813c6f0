"""``VideoReader``: exact frames of a video as model-ready tensors, decoded by FFmpeg on the CPU or NVDEC.

Frame ``i`` is the i-th frame a full sequential decode outputs (presentation order), whatever the container's
headers or timestamps say. Opening a file lists its packets (no decoding; for MP4/MOV from the demuxer's
sample index, checked against the file) for the exact frame count and the keyframes; :meth:`VideoReader.get_frames` then decodes only what the requested frames need, forward only, and
converts each requested frame in one fused pass (colour conversion, antialiased bilinear resize, normalization)
straight into the output tensor.
"""

import ctypes
import io
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class VideoMetadata:
    num_frames: int  # frames a full decode yields (from a scan of the demuxed packets, not the header)
    fps: float  # the container's average frame rate (num_frames / duration where it gives none)
    duration: float  # seconds from the first frame's start to the last frame's end
    width: int
    height: int
    codec: str
    pixel_format: str
    keyframes: tuple[int, ...]  # indices of keyframes, in presentation order
    decode_device: str  # "cpu", or "cuda" when NVDEC decodes


def _reader_class():
    import pyvidfast

    if not pyvidfast.build_info()["video_reader"]:
        raise RuntimeError(
            "VideoReader: this build of pyvidfast has no frame reader: FFmpeg's development files were missing at "
            "build time, or it was built with VIDFAST_FFMPEG=OFF (Debian: apt-get install libavformat-dev "
            "libavcodec-dev libavutil-dev libswscale-dev pkg-config), then rebuild with `make build`."
        )
    return torch.classes.vidfast.VideoReader


def _cuda_index(device: torch.device) -> int:
    if device.type == "cpu":
        return -1
    if device.type != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda'; got {device}")
    import pyvidfast

    if not pyvidfast.build_info()["cuda_kernels"]:
        raise RuntimeError("device: this build of pyvidfast has no CUDA kernels; use device='cpu'")
    if not torch.cuda.is_available():
        raise RuntimeError("device: CUDA was asked for but torch sees no GPU")
    return device.index if device.index is not None else torch.cuda.current_device()


# read_at(offset, buffer, size) -> bytes read, 0 at the end, -1 on an error (csrc/video_reader/video_reader.h).
_READ_AT = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


class _FileSource:
    """A binary file object read by the C++ reader through a ctypes callback (ctypes takes the GIL for each call;
    the reader makes one call at a time per source, each a seek then a read, so decoders in other threads do not
    move the file position under each other)."""

    def __init__(self, file):
        if getattr(file, "closed", False):
            raise ValueError("source: the file object is closed")
        if isinstance(file, io.TextIOBase):
            raise TypeError("source: expected a binary file object (opened with 'rb'); got a text file")
        if not (callable(getattr(file, "seekable", None)) and file.seekable()):
            raise ValueError("source: the file object must be seekable (the reader seeks to decode); read it into "
                             "bytes first")
        probe = file.read(0)
        if not isinstance(probe, (bytes, bytearray)):
            raise TypeError(f"source: expected a binary file object whose read() returns bytes; got {type(probe)}")
        self.file = file
        self.size = file.seek(0, io.SEEK_END)
        if self.size <= 0:
            raise ValueError("source: the file object is empty")
        self.error: BaseException | None = None
        self.callback = _READ_AT(self._read_at)  # kept alive as long as the reader
        self.address = ctypes.cast(self.callback, ctypes.c_void_p).value

    def _read_at(self, offset: int, buffer: int, size: int) -> int:
        try:
            self.file.seek(offset)
            view = memoryview((ctypes.c_char * size).from_address(buffer)).cast("B")
            readinto = getattr(self.file, "readinto", None)
            if readinto is not None:
                return readinto(view) or 0
            data = self.file.read(size)
            view[: len(data)] = data
            return len(data)
        except BaseException as e:  # reported by the reader's caller (an exception cannot cross into C++)
            self.error = e
            return -1


def _memory_tensor(data) -> Tensor:
    """uint8 tensor over the caller's bytes, bytearray or memoryview (no copy; the tensor keeps the buffer alive,
    so a bytearray cannot be resized under the reader)."""
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("source: the memoryview must be contiguous")
    if view.nbytes == 0:
        raise ValueError("source: the bytes are empty")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read only
        return torch.frombuffer(view.cast("B"), dtype=torch.uint8)


class VideoReader:
    """Reads frames of one video.

    Args:
        source: a local video file (``str`` or path), or the video's bytes: ``bytes``, ``bytearray`` or
            ``memoryview``, or a binary file object with ``read`` and ``seek`` (an open file, ``io.BytesIO``, a
            ``tarfile`` member), read from its start; frames are the same as from the file.
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` to decode with NVDEC and return CUDA tensors (streams
            NVDEC cannot take, such as H.264 4:4:4, are decoded on the CPU with a warning).
        threads: decoding threads; 0 = automatic (FFmpeg's choice for one decoder, and up to torch's thread count
            of decoders working on different GOPs in parallel). Use 1 inside DataLoader workers.
        allowed_formats: FFmpeg demuxers that open other files named inside the input (``"hls"``, ``"concat"``,
            ``"dash"``, ``"image2"``, ...), which are refused unless named here; even then only local files open.

    Use it as a context manager, or call :meth:`close`, to release the file early. Open readers inside each
    DataLoader worker: a reader opened before a fork shares its file position with the children.
    """

    def __init__(self, source, device: str | torch.device = "cpu", threads: int = 0, *,
                 allowed_formats: Sequence[str] = (), _read_all_packets: bool = False):
        if not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads: expected 0 (automatic) or a positive int; got {threads!r}")
        if isinstance(allowed_formats, str) or not all(isinstance(f, str) for f in allowed_formats):
            raise TypeError(f"allowed_formats: expected a sequence of FFmpeg demuxer names; got {allowed_formats!r}")
        path, data, self._file_source = "", torch.empty(0, dtype=torch.uint8), None
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if not os.path.exists(path):
                raise FileNotFoundError(f"path: no such file: {path!r}")
            if os.path.isdir(path):
                raise IsADirectoryError(f"path: {path!r} is a directory, not a video file")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = _memory_tensor(source)
        elif callable(getattr(source, "read", None)) and callable(getattr(source, "seek", None)):
            self._file_source = _FileSource(source)
        else:
            raise TypeError("source: expected a path, bytes, bytearray, memoryview or a binary file object with "
                            f"read and seek; got {type(source).__name__}")
        self.path = path or None  # None for byte input
        self.device = torch.device(device)
        # Private (tests): _read_all_packets lists packets by reading them even where the MP4/MOV sample index
        # would do; the C++ object's underscored methods (_index_used, _decoders_used, _seek_frames) say how the
        # reader worked.
        f = self._file_source
        self._reader = self._call(_reader_class(), path, data, f.address if f else 0, f.size if f else 0,
                                  _cuda_index(self.device), threads, bool(_read_all_packets), list(allowed_formats))
        r = self._reader
        self.metadata = VideoMetadata(
            num_frames=r.num_frames(), fps=r.fps(), duration=r.duration(), width=r.width(), height=r.height(),
            codec=r.codec(), pixel_format=r.pixel_format(), keyframes=tuple(r.keyframes()),
            decode_device=r.decode_device(),
        )
        if r.scan_error():
            warnings.warn(f"VideoReader: {self._name()} could not be read to the end ({r.scan_error()}); "
                          f"{self.metadata.num_frames} frames were found", stacklevel=2)

    def _name(self) -> str:
        return repr(self.path) if self.path else ("<bytes>" if self._file_source is None else "<file object>")

    def _call(self, fn, *args):
        """fn(*args), with a failure of the file object's read or seek raised as itself."""
        try:
            return fn(*args)
        except Exception as e:
            error = self._file_source.error if self._file_source else None
            if error is not None:
                self._file_source.error = None
                raise OSError(f"source: reading the file object failed: {error!r}") from error
            raise e

    def __len__(self) -> int:
        return self.metadata.num_frames

    def __repr__(self) -> str:
        m = self.metadata
        return (f"VideoReader({self._name()}, {m.num_frames} frames, {m.width}x{m.height}, {m.fps:.3g} fps, "
                f"{m.codec}, decode on {m.decode_device})")

    def timestamps(self) -> Tensor:
        """float64 ``[num_frames]``: presentation time of each frame in seconds, the first frame at 0."""
        return self._reader.timestamps()

    def get_frames(
        self,
        indices: Sequence[int] | Tensor,
        size: int | tuple[int, int] | None = None,
        layout: str = "THWC",
        dtype: torch.dtype = torch.uint8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        partial: bool = False,
    ) -> Tensor:
        """Frames at ``indices`` (any order, duplicates allowed), in that order.

        Args:
            size: ``(height, width)`` (or one int for a square) to resize to with antialiased bilinear filtering
                (PyTorch's ``interpolate(mode="bilinear", antialias=True)``); None keeps the native size.
            layout: ``"THWC"`` -> ``[T, H, W, 3]``, or ``"CTHW"`` -> ``[3, T, H, W]`` (video models' layout).
            dtype: ``torch.uint8`` (0..255), or ``torch.float32`` / ``torch.bfloat16``: RGB in [0, 1], then
                ``(x - mean) / std`` per channel when ``mean`` and ``std`` are given.
            partial: a file that breaks before a requested frame raises unless this is True; then the frames
                that decode are returned (in request order) with a warning.

        At the native size, uint8 THWC frames come from libswscale and equal what PyAV returns; every other
        output is made by the fused kernel from the decoded YUV (standard BT.601/709 matrices).
        """
        if isinstance(indices, Tensor):
            idx = indices.detach().to("cpu", torch.int64).reshape(-1)
        else:
            idx = torch.as_tensor(list(indices), dtype=torch.int64).reshape(-1)
        if size is None:
            height = width = 0
        else:
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
                raise ValueError(f"size: expected positive (height, width) ints; got {size!r}")
        if (mean is None) != (std is None):
            raise ValueError("mean/std: give both or neither")
        mean = [float(v) for v in mean] if mean is not None else []
        std = [float(v) for v in std] if std is not None else []
        return self._call(self._reader.get_frames, idx, height, width, layout, dtype, mean, std, bool(partial))

    def __getitem__(self, index: int | slice) -> Tensor:
        """One uint8 ``[H, W, 3]`` frame, or uint8 ``[T, H, W, 3]`` for a slice."""
        if isinstance(index, slice):
            return self.get_frames(range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        return self.get_frames([index])[0]

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_frames(path, count: int, start: int = 0, stride: int = 1, size: tuple[int, int] | None = None,
                  threads: int = 0) -> Tensor:
    """Frames start, start+stride, ... (count of them) as uint8 ``[count, H, W, 3]``, resized to ``size=(H, W)``
    (antialiased bilinear) when given: the one-call form used by tests, benchmarks and the demo."""
    with VideoReader(path, threads=threads) as reader:
        if start + (count - 1) * stride >= len(reader):
            raise ValueError(f"path: {path} has fewer than {start + (count - 1) * stride + 1} frames")
        return reader.get_frames([start + i * stride for i in range(count)], size=size)
