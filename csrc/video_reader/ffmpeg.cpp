#include "video_reader/ffmpeg.h"

#include <c10/util/Exception.h>

namespace vidfast::video_reader {

FormatContextPtr open_format(const std::string& path) {
  AVFormatContext* raw = nullptr;  // avformat_open_input frees it itself where it fails
  const int ret = avformat_open_input(&raw, path.c_str(), nullptr, nullptr);
  TORCH_CHECK_VALUE(ret >= 0, "path: cannot open '", path, "' as a video: ", av_error_text(ret));
  return FormatContextPtr(raw);
}

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
