#pragma once
// Owners of FFmpeg's objects: every context, packet, frame and buffer the reader holds is a std::unique_ptr whose
// deleter is FFmpeg's own free function, so no path (errors included) closes anything by hand.
#include <memory>
#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libswscale/swscale.h>
}

namespace vidfast::video_reader {

struct FormatContextDeleter {
  void operator()(AVFormatContext* c) const { avformat_close_input(&c); }
};
struct CodecContextDeleter {
  void operator()(AVCodecContext* c) const { avcodec_free_context(&c); }
};
struct PacketDeleter {
  void operator()(AVPacket* p) const { av_packet_free(&p); }
};
struct FrameDeleter {
  void operator()(AVFrame* f) const { av_frame_free(&f); }
};
struct SwsContextDeleter {
  void operator()(SwsContext* c) const { sws_freeContext(c); }
};
struct BufferRefDeleter {
  void operator()(AVBufferRef* b) const { av_buffer_unref(&b); }
};
// An AVIO context opened by FFmpeg's protocols (avio_open2), or one of ours over byte input (avio_alloc_context,
// whose buffer FFmpeg may have replaced: freed through the context).
struct AvioContextDeleter {
  bool ours = false;
  void operator()(AVIOContext* c) const {
    if (ours) {
      av_freep(&c->buffer);
      avio_context_free(&c);
    } else {
      avio_closep(&c);
    }
  }
};

using FormatContextPtr = std::unique_ptr<AVFormatContext, FormatContextDeleter>;
using CodecContextPtr = std::unique_ptr<AVCodecContext, CodecContextDeleter>;
using PacketPtr = std::unique_ptr<AVPacket, PacketDeleter>;
using FramePtr = std::unique_ptr<AVFrame, FrameDeleter>;
using SwsContextPtr = std::unique_ptr<SwsContext, SwsContextDeleter>;
using BufferRefPtr = std::unique_ptr<AVBufferRef, BufferRefDeleter>;
using AvioContextPtr = std::unique_ptr<AVIOContext, AvioContextDeleter>;

// A fresh packet / frame; throws where FFmpeg cannot allocate one.
PacketPtr make_packet();
FramePtr make_frame();

// FFmpeg's message for an error code.
std::string av_error_text(int code);

}  // namespace vidfast::video_reader
