"""Frame sampling: an exact FFmpeg-backed reader (CPU or NVDEC), sampling strategies and a video Dataset."""

from pyvidfast.io import sampling
from pyvidfast.io.dataset import DenseClips, VideoDataset, read_list_file
from pyvidfast.io.reader import VideoMetadata, VideoReader, decode_frames

__all__ = ["DenseClips", "VideoDataset", "VideoMetadata", "VideoReader", "decode_frames", "read_list_file",
           "sampling"]
