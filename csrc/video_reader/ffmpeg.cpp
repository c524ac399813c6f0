#include "video_reader/ffmpeg.h"

#include <c10/util/Exception.h>

namespace vidfast::video_reader {

PacketPtr make_packet() {
  PacketPtr p(av_packet_alloc());
  TORCH_CHECK(p, "VideoReader: out of memory");
  return p;
}

FramePtr make_frame() {
  FramePtr f(av_frame_alloc());
  TORCH_CHECK(f, "VideoReader: out of memory");
  return f;
}

std::string av_error_text(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof(buf));
  return buf;
}

}  // namespace vidfast::video_reader
