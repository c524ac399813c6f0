// One demuxer + decoder over the file: opening, seeking to seek points, decoding forward, and identifying each
// decoded frame (by counting from a verified seek point, or by pts where non-reference frames are skipped).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
#include <libavutil/pixdesc.h>
}

#include "common/nvtx.h"
#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

// Broken pictures a decoder skips, as players do, before a request gives up on the file.
constexpr int64_t kMaxDecodeErrors = 10000;
// Packets a decoder may take without outputting a frame before decoding counts as stuck (a real stream outputs
// a frame every few packets; skipped non-reference pictures are a few in a row).
constexpr int64_t kMaxPacketsWithoutFrame = 4096;

// Thrown inside a request when decoded timestamps disagree with the scanned pts order, so frames cannot be
// identified by pts (needed to skip non-reference frames); becomes WorkFailure::kPtsOrderMismatch.
struct PtsOrderMismatch {};

// Thrown when decoding from a seek point does not start with the frame the index expects there; becomes
// WorkFailure::kBadSeekPoint.
struct BadSeekPoint {};

bool is_mov(const AVFormatContext* fmt) { return std::strncmp(fmt->iformat->name, "mov,", 4) == 0; }

bool same_packet(const AVPacket* packet, const PacketInfo& p) {
  return packet->pts == p.pts && packet->dts == p.dts && packet->pos == p.pos;
}

AVPixelFormat pick_cuda_format(AVCodecContext*, const AVPixelFormat* formats) {
  for (const AVPixelFormat* f = formats; *f != AV_PIX_FMT_NONE; ++f) {
    if (*f == AV_PIX_FMT_CUDA) return *f;
  }
  for (const AVPixelFormat* f = formats; *f != AV_PIX_FMT_NONE; ++f) {  // NVDEC refused the stream: software
    if (!(av_pix_fmt_desc_get(*f)->flags & AV_PIX_FMT_FLAG_HWACCEL)) return *f;
  }
  return AV_PIX_FMT_NONE;
}

}  // namespace

Decoder::Decoder(Source source_in, int stream_index_in)
    : source(std::move(source_in)), path(source.name()), stream_index(stream_index_in),
      probe(stream_index_in < 0) {
  open_input();
}

void Decoder::open_input() {
  fmt.reset();  // before the AVIO context under it
  fmt = open_demuxer(source, &input);
  const std::string arg = source.argument();
  if (probe || !is_mov(fmt.get())) {
    // The decoders the probing opens refuse pictures over the size limit instead of allocating them.
    std::vector<AVDictionary*> options(fmt->nb_streams, nullptr);
    for (auto& o : options) av_dict_set_int(&o, "max_pixels", kMaxPicturePixels, 0);
    const int ret = avformat_find_stream_info(fmt.get(), options.data());
    for (auto& o : options) av_dict_free(&o);
    TORCH_CHECK_VALUE(ret >= 0, arg, ": cannot read stream information from ", path, ": ", av_error_text(ret));
  }
  if (stream_index < 0) {
    const int ret = av_find_best_stream(fmt.get(), AVMEDIA_TYPE_VIDEO, -1, -1, nullptr, 0);
    TORCH_CHECK_VALUE(ret >= 0, arg, ": ", path, " has no video stream");
    stream_index = ret;
  }
  TORCH_CHECK(stream_index < static_cast<int>(fmt->nb_streams), "VideoReader: ", path,
              " changed since it was opened");
  const AVCodecParameters* par = stream()->codecpar;
  TORCH_CHECK_VALUE(par->width >= 0 && par->height >= 0 && par->width <= kMaxPictureSide &&
                        par->height <= kMaxPictureSide && int64_t{par->width} * par->height <= kMaxPicturePixels,
                    arg, ": ", path, " declares ", par->width, "x", par->height,
                    " pixel pictures, over the reader's limit (", kMaxPictureSide, " a side, ", kMaxPicturePixels,
                    " pixels)");
  for (unsigned i = 0; i < fmt->nb_streams; ++i) {
    fmt->streams[i]->discard = static_cast<int>(i) == stream_index ? AVDISCARD_DEFAULT : AVDISCARD_ALL;
  }
}

void Decoder::open_codec(int threads, AVBufferRef* hw_device) {
  const AVCodecParameters* par = stream()->codecpar;
  const AVCodec* decoder = avcodec_find_decoder(par->codec_id);
  TORCH_CHECK_NOT_IMPLEMENTED(decoder, "VideoReader: no decoder for codec '", avcodec_get_name(par->codec_id),
                              "' of ", path, " in this FFmpeg build");
  codec.reset(avcodec_alloc_context3(decoder));
  TORCH_CHECK(codec, "VideoReader: out of memory");
  int ret = avcodec_parameters_to_context(codec.get(), par);
  TORCH_CHECK(ret >= 0, "VideoReader: bad codec parameters in ", path, ": ", av_error_text(ret));
  codec->pkt_timebase = stream()->time_base;
  // Crop exactly: by default FFmpeg rounds a crop offset down to keep the planes aligned, so a picture cropped
  // at an unaligned left offset (Theora, H.264 frame cropping) comes out wider, shifted left.
  codec->flags |= AV_CODEC_FLAG_UNALIGNED;
  codec->max_pixels = kMaxPicturePixels;  // a stream that grows past the limit fails instead of allocating
  codec->thread_count = threads;
  codec->thread_type = FF_THREAD_FRAME | FF_THREAD_SLICE;
  if (hw_device) {
    codec->hw_device_ctx = av_buffer_ref(hw_device);
    TORCH_CHECK(codec->hw_device_ctx, "VideoReader: out of memory");
    codec->get_format = pick_cuda_format;
    codec->thread_count = 1;  // NVDEC decodes asynchronously itself
  }
  ret = avcodec_open2(codec.get(), decoder, nullptr);
  TORCH_CHECK_NOT_IMPLEMENTED(ret >= 0, "VideoReader: cannot open the '", decoder->name, "' decoder for ", path,
                              ": ", av_error_text(ret));
}

void Decoder::reopen() {
  fmt.reset();
  open_input();
  if (codec) avcodec_flush_buffers(codec.get());
  next_packet = 0;
  held_packet = false;
  demux_eof = false;
}

bool Decoder::read_packet() {
  while (true) {
    const int ret = av_read_frame(fmt.get(), packet.get());
    if (ret < 0) return false;
    if (packet->stream_index == stream_index) {
      TORCH_CHECK_VALUE(packet->size <= kMaxPacketBytes, source.argument(), ": ", path, " has a packet of ",
                        packet->size, " bytes, over the reader's limit of ", kMaxPacketBytes);
      return true;
    }
    av_packet_unref(packet.get());
  }
}

void Decoder::decode(const PacketIndex& index, Request& req, Work& w) {
  try {
    run_plan(index, req, w);
  } catch (const PtsOrderMismatch&) {
    w.failure = WorkFailure::kPtsOrderMismatch;
  } catch (const BadSeekPoint&) {
    w.failure = WorkFailure::kBadSeekPoint;
    w.bad_seek = last_seek;
  } catch (...) {
    w.error = std::current_exception();
  }
  if (w.failure != WorkFailure::kNone || w.error) w.pending.clear();
}

// Positions the demuxer on packet sp.packet (held in `packet`) with a flushed decoder.
void Decoder::seek_to(const PacketIndex& index, const SeekPoint& sp) {
  VIDFAST_NVTX_RANGE("decode/seek");
  if (!primed && sp.packet > 0) {
    // Decoders learn from the stream's first packet things that later packets rely on and a flush keeps (for
    // H.264, the x264 build in its SEI, which switches on workarounds for old encoder bugs: without it, 4:4:4
    // streams from old x264 decode to garbage after a seek). Send it once before the first seek elsewhere; of
    // length-prefixed H.264 only its parameter sets and SEI (no picture to decode).
    seek_to(index, {0, 0});
    held_packet = false;
    const bool h264 = stream()->codecpar->codec_id == AV_CODEC_ID_H264;
    if (!h264 || keep_h264_headers(packet.get(), nal_length_size(stream()->codecpar))) {
      // (H.264 reports a packet without a picture as an error unless non-reference pictures may be skipped.)
      codec->skip_frame = h264 ? AVDISCARD_NONREF : AVDISCARD_DEFAULT;
      if (avcodec_send_packet(codec.get(), packet.get()) >= 0) {
        while (avcodec_receive_frame(codec.get(), frame.get()) == 0) av_frame_unref(frame.get());
      }
    }
    av_packet_unref(packet.get());
  }
  primed = true;
  avcodec_flush_buffers(codec.get());
  held_packet = false;
  demux_eof = false;
  const PacketInfo& target = index.packets[sp.packet];
  const int64_t ts = target.dts != kNoTs ? target.dts : target.pts;
  bool found = false;
  if (ts != kNoTs && av_seek_frame(fmt.get(), stream_index, ts, AVSEEK_FLAG_BACKWARD) >= 0) {
    while (read_packet()) {
      if (same_packet(packet.get(), target)) {
        found = true;
        break;
      }
      const bool past = (target.pos >= 0 && packet->pos > target.pos) ||
                        (target.dts != kNoTs && packet->dts != kNoTs && packet->dts > target.dts);
      av_packet_unref(packet.get());
      if (past) break;
    }
  }
  if (!found) {  // the container cannot seek there: reopen and walk the packets (demuxing only)
    reopen();
    for (int64_t k = 0; k <= sp.packet; ++k) {
      TORCH_CHECK(read_packet(), "VideoReader: ", path, " changed since it was opened");
      if (k < sp.packet) av_packet_unref(packet.get());
    }
  }
  held_packet = true;
  packets_without_frame = 0;
  next_packet = sp.packet;
  next_frame = sp.frame;
  verify_next = sp.packet > 0;
  last_seek = sp;
  sent_skipped.assign(index.num_frames, 0);
  positioned = true;
}

int64_t Decoder::next_decoded_frame(const PacketIndex& index, const Request& req) {
  while (true) {
    int ret = avcodec_receive_frame(codec.get(), frame.get());
    if (ret == 0) {
      packets_without_frame = 0;
      return identify(index, frame.get());
    }
    if (ret == AVERROR_EOF) {
      positioned = false;
      return -1;
    }
    if (ret != AVERROR(EAGAIN)) {  // a broken picture (frame threads report it here): skip it, as players do
      TORCH_CHECK(++decode_errors < kMaxDecodeErrors, "VideoReader: decoding ", path, " keeps failing: ",
                  av_error_text(ret));
      continue;
    }
    if (demux_eof) {
      positioned = false;
      return -1;
    }
    if (!held_packet && !read_packet()) {
      demux_eof = true;
      avcodec_send_packet(codec.get(), nullptr);  // drain the frames the decoder still holds
      continue;
    }
    held_packet = false;
    const int64_t k = next_packet++;
    const bool known = k < static_cast<int64_t>(index.packets.size());
    if (packet->size == 0) {  // an empty packet would read as "drain"; it carries no picture
      av_packet_unref(packet.get());
      continue;
    }
    const int64_t f = known ? index.frame_of_packet[k] : -1;
    const bool skippable = index.skip_nonref && (f < 0 || !req.wanted[f]);
    codec->skip_frame = skippable ? AVDISCARD_NONREF : AVDISCARD_DEFAULT;
    if (skippable && f >= 0) sent_skipped[f] = 1;
    TORCH_CHECK(++packets_without_frame <= kMaxPacketsWithoutFrame, "VideoReader: decoding ", path,
                " stopped making progress: ", kMaxPacketsWithoutFrame, " packets gave no frame");
    ret = avcodec_send_packet(codec.get(), packet.get());
    av_packet_unref(packet.get());
    if (ret < 0 && ret != AVERROR(EAGAIN)) ++decode_errors;  // a corrupt packet: go on, as players do
  }
}

int64_t Decoder::identify(const PacketIndex& index, const AVFrame* f) {
  if (!index.skip_nonref) {
    // The first frame after a seek must be the one the scan expects there (pts being known).
    if (verify_next && index.all_pts && f->pts != index.frame_keys[next_frame]) throw BadSeekPoint{};
    verify_next = false;
    return next_frame++;
  }
  // Frames are identified by pts; every frame between the last one and this one must have been allowed to be
  // skipped, else the decoder's order is not the pts order.
  const auto it = std::lower_bound(index.frame_keys.begin(), index.frame_keys.end(), f->pts);
  if (f->pts == kNoTs || it == index.frame_keys.end() || *it != f->pts) throw PtsOrderMismatch{};
  const int64_t i = it - index.frame_keys.begin();
  if (i < next_frame) throw PtsOrderMismatch{};
  for (int64_t k = next_frame; k < i; ++k) {
    if (!sent_skipped[k]) throw PtsOrderMismatch{};
  }
  next_frame = i + 1;
  return i;
}

void Decoder::run_plan(const PacketIndex& index, Request& req, Work& w) {
  for (size_t n = 0; n < w.targets.size(); ++n) {
    const size_t j = w.targets[n];
    const int64_t t = req.targets[j];
    const SeekPoint sp = index.seek_point_before(t);
    // Seek only forward past packets we would otherwise decode, or when the decoder is behind the target.
    if (!positioned || t < next_frame || sp.packet > next_packet) seek_to(index, sp);
    while (true) {
      const int64_t i = next_decoded_frame(index, req);
      if (i < 0) {
        for (size_t k = n; k < w.targets.size(); ++k) w.missing.push_back(req.targets[w.targets[k]]);
        flush_conversions(req, w);
        return;
      }
      if (i < t) continue;  // decoded but not requested: never converted
      if (i > t) {  // only possible when frames are identified by pts
        TORCH_CHECK(index.skip_nonref, "VideoReader: internal error: frame ", t, " was passed over");
        throw PtsOrderMismatch{};
      }
      enqueue_conversion(*this, req, w, j);
      break;
    }
  }
  flush_conversions(req, w);
}

}  // namespace vidfast::video_reader
