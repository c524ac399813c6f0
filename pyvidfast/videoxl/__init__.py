"""Video-XL: ``python -m pyvidfast.videoxl --checkpoint DIR --video movie.mp4 --prompt "..."`` (see
:mod:`pyvidfast.models.videoxl` for the model)."""

from pyvidfast.models.videoxl import IMAGE_TOKEN_INDEX, VideoXL, chat_input_ids, load_video

__all__ = ["IMAGE_TOKEN_INDEX", "VideoXL", "chat_input_ids", "load_video"]
