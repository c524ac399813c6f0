// An exact, planned frame reader over FFmpeg, exposed as the torch custom class vidfast.VideoReader.
//
// Frame i is the i-th frame a full sequential decode outputs. Opening lists every packet of the video stream
// (no decoding) to count frames and to find the keyframes where decoding may start without changing any later
// frame: for MP4/MOV from the demuxer's sample index (checked against the file's sample tables and against
// packets read at both ends), else by reading every packet. A request is planned: sorted and de-duplicated, decoded forward only, seeking to a keyframe only when it
// skips packets, converting only requested frames, and (where pts order has been verified) asking the decoder
// to skip non-reference frames that are not requested.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <memory>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/hwcontext.h>
#include <libavutil/pixdesc.h>
#include <libswscale/swscale.h>
}

#include "common/nvtx.h"
#include "video_reader/convert.h"

namespace vidfast::video_reader {
namespace {

constexpr int64_t kNoTs = AV_NOPTS_VALUE;

std::string av_error_text(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof(buf));
  return buf;
}

// One demuxed packet of the video stream, in decode order.
struct PacketInfo {
  int64_t pts, dts, pos, duration;
  bool key;
  bool safe_start;  // a keyframe decoding can start at (for H.264 / HEVC: an IDR picture)
  bool has_frame;  // false for packets flagged discard and empty packets: a sequential decode outputs no frame
};

// A packet decoding may start at: `frame` is the index of the first frame it outputs.
struct SeekPoint {
  int64_t packet, frame;
};

// Raised inside a request when decoded timestamps disagree with the scanned pts order, so frames cannot be
// identified by pts (needed to skip non-reference frames). The request is redone without skipping.
struct PtsOrderMismatch {};

// Raised when decoding from a seek point does not start with the frame the scan expects there; the seek point is
// dropped and the request redone.
struct BadSeekPoint {};

// H.264 / HEVC keyframe flags also mark recovery-point I-frames (open GOPs), after which FFmpeg's decoder may
// drop or reorder frames; only instantaneous decoder refresh pictures are safe starts. `nal_length` is the size of
// the length prefix (MP4/Matroska "avcC"/"hvcC" streams) or 0 for Annex B start codes.
bool has_idr_nal(const uint8_t* data, int size, int nal_length, bool hevc) {
  auto is_idr = [&](uint8_t header) {
    const int type = hevc ? (header >> 1) & 0x3f : header & 0x1f;
    return hevc ? (type == 19 || type == 20) : type == 5;
  };
  if (nal_length > 0) {
    for (int64_t at = 0; at + nal_length < size;) {
      int64_t len = 0;
      for (int b = 0; b < nal_length; ++b) len = (len << 8) | data[at + b];
      at += nal_length;
      if (len <= 0 || at + len > size) return false;
      if (is_idr(data[at])) return true;
      at += len;
    }
    return false;
  }
  for (int i = 0; i + 3 < size; ++i) {
    if (data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 && is_idr(data[i + 3])) return true;
  }
  return false;
}

// Length-prefix size of H.264 / HEVC packets from the codec's extradata; 0 for Annex B.
int nal_length_size(const AVCodecParameters* par) {
  const uint8_t* x = par->extradata;
  if (par->codec_id == AV_CODEC_ID_H264 && par->extradata_size >= 7 && x[0] == 1) return (x[4] & 3) + 1;
  if (par->codec_id == AV_CODEC_ID_HEVC && par->extradata_size >= 23 && x[0] == 1) return (x[21] & 3) + 1;
  return 0;
}

// The sample tables of one MP4/MOV track that the demuxer's index does not keep.
struct Mp4Track {
  std::vector<uint32_t> sizes;   // 'stsz': bytes of each sample
  std::vector<int64_t> offsets;  // 'ctts': composition (pts - dts) offset of each sample; empty without 'ctts'
};

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

// Calls visit(type, payload, payload_size) for each box in [data, data + size); false if a box is malformed.
template <typename Visit>
bool for_each_box(const uint8_t* data, int64_t size, Visit&& visit) {
  for (int64_t at = 0; at < size;) {
    if (size - at < 8) return false;
    int64_t box = be32(data + at), header = 8;
    if (box == 1) {
      if (size - at < 16) return false;
      box = (int64_t{be32(data + at + 8)} << 32) | be32(data + at + 12), header = 16;
    } else if (box == 0) {
      box = size - at;
    }
    if (box < header || box > size - at) return false;
    if (!visit(std::string(reinterpret_cast<const char*>(data + at + 4), 4), data + at + header, box - header)) {
      return false;
    }
    at += box;
  }
  return true;
}

// Finds the 'stsz' and 'ctts' tables of track `track_id` (tkhd). False for anything unexpected: no or several
// 'moov', fragments ('moof', 'mvex'), compact sizes ('stz2'), several tables, huge composition offsets (which
// FFmpeg ignores).
bool read_mp4_track(AVIOContext* pb, int track_id, Mp4Track* out) {
  const int64_t file_size = avio_size(pb);
  if (file_size <= 0) return false;
  std::vector<uint8_t> moov;
  int moov_count = 0;
  for (int64_t at = 0; at + 8 <= file_size;) {
    uint8_t head[16];
    if (avio_seek(pb, at, SEEK_SET) != at || avio_read(pb, head, 8) != 8) return false;
    int64_t box = be32(head), header = 8;
    if (box == 1) {
      if (avio_read(pb, head + 8, 8) != 8) return false;
      box = (int64_t{be32(head + 8)} << 32) | be32(head + 12), header = 16;
    } else if (box == 0) {
      box = file_size - at;
    }
    if (box < header) return false;
    const std::string type(reinterpret_cast<const char*>(head + 4), 4);
    if (type == "moof" || type == "mfra") return false;
    if (type == "moov") {
      if (++moov_count > 1 || box - header > (int64_t{1} << 30) || at + box > file_size) return false;
      moov.resize(box - header);
      if (avio_read(pb, moov.data(), static_cast<int>(moov.size())) != static_cast<int>(moov.size())) return false;
    }
    at += box;
  }
  if (moov_count != 1) return false;

  int tracks_found = 0;
  bool ok = for_each_box(moov.data(), static_cast<int64_t>(moov.size()), [&](const std::string& type,
                                                                              const uint8_t* p, int64_t size) {
    if (type == "mvex") return false;
    if (type != "trak") return true;
    int64_t id = -1;
    Mp4Track t;
    int stsz_count = 0, ctts_count = 0;
    bool stz2 = false;
    std::function<bool(const std::string&, const uint8_t*, int64_t)> walk = [&](const std::string& type,
                                                                                 const uint8_t* q, int64_t n) {
      if (type == "mdia" || type == "minf" || type == "stbl") return for_each_box(q, n, walk);
      if (type == "tkhd") {
        const int64_t id_at = n >= 1 && q[0] == 1 ? 20 : 12;
        if (n < id_at + 4) return false;
        id = be32(q + id_at);
      } else if (type == "stz2") {
        stz2 = true;
      } else if (type == "stsz") {
        ++stsz_count;
        if (n < 12) return false;
        const uint32_t constant = be32(q + 4), count = be32(q + 8);
        if (constant == 0 && (n - 12) / 4 < count) return false;
        t.sizes.resize(count);
        for (uint32_t k = 0; k < count; ++k) t.sizes[k] = constant ? constant : be32(q + 12 + 4 * k);
      } else if (type == "ctts") {
        ++ctts_count;
        if (n < 8) return false;
        const uint32_t entries = be32(q + 4);
        if ((n - 8) / 8 < entries) return false;
        for (uint32_t e = 0; e < entries; ++e) {
          const uint32_t count = be32(q + 8 + 8 * e);
          const int64_t offset = static_cast<int32_t>(be32(q + 12 + 8 * e));
          if (offset <= -(int64_t{1} << 28) || offset >= (int64_t{1} << 28)) return false;
          if (t.offsets.size() + count > (size_t{1} << 31)) return false;
          t.offsets.insert(t.offsets.end(), count, offset);
        }
      }
      return true;
    };
    if (!for_each_box(p, size, walk)) return false;
    if (id != track_id) return true;
    ++tracks_found;
    if (stz2 || stsz_count != 1 || ctts_count > 1) return false;
    *out = std::move(t);
    return true;
  });
  return ok && tracks_found == 1;
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

ColorTransform color_transform_of(const AVFrame* f) {
  const auto fmt = static_cast<AVPixelFormat>(f->format);
  if (fmt == AV_PIX_FMT_GBRP) return gbr_to_rgb_transform();
  const bool full = f->color_range == AVCOL_RANGE_JPEG || fmt == AV_PIX_FMT_YUVJ420P ||
                    fmt == AV_PIX_FMT_YUVJ422P || fmt == AV_PIX_FMT_YUVJ444P;
  switch (f->colorspace) {
    case AVCOL_SPC_BT709:
      return yuv_to_rgb_transform(0.2126, 0.0722, full);
    case AVCOL_SPC_BT2020_NCL:
    case AVCOL_SPC_BT2020_CL:
      return yuv_to_rgb_transform(0.2627, 0.0593, full);
    case AVCOL_SPC_SMPTE240M:
      return yuv_to_rgb_transform(0.212, 0.087, full);
    case AVCOL_SPC_FCC:
      return yuv_to_rgb_transform(0.30, 0.11, full);
    default:  // unspecified, BT.470BG, SMPTE 170M: BT.601, as libswscale assumes
      return yuv_to_rgb_transform(0.299, 0.114, full);
  }
}

// Subsampling of the 8-bit planar / semi-planar formats the kernels read directly; false for the others.
bool direct_format(AVPixelFormat fmt, int* sub_x, int* sub_y, bool* nv12) {
  *nv12 = false;
  switch (fmt) {
    case AV_PIX_FMT_YUV420P:
    case AV_PIX_FMT_YUVJ420P:
      *sub_x = 2, *sub_y = 2;
      return true;
    case AV_PIX_FMT_NV12:
      *sub_x = 2, *sub_y = 2, *nv12 = true;
      return true;
    case AV_PIX_FMT_YUV422P:
    case AV_PIX_FMT_YUVJ422P:
      *sub_x = 2, *sub_y = 1;
      return true;
    case AV_PIX_FMT_YUV444P:
    case AV_PIX_FMT_YUVJ444P:
    case AV_PIX_FMT_GBRP:
      *sub_x = 1, *sub_y = 1;
      return true;
    default:
      return false;
  }
}

PictureView picture_view(const AVFrame* f) {
  int sx, sy;
  bool nv12;
  TORCH_CHECK(direct_format(static_cast<AVPixelFormat>(f->format), &sx, &sy, &nv12), "internal: unexpected format");
  PictureView v{};
  const float w = static_cast<float>(f->width), h = static_cast<float>(f->height);
  const int cw = (f->width + sx - 1) / sx, ch = (f->height + sy - 1) / sy;
  v.planes[0] = {f->data[0], f->linesize[0], 1, f->width, f->height, w, h};
  if (nv12) {
    v.planes[1] = {f->data[1], f->linesize[1], 2, cw, ch, w / sx, h / sy};
    v.planes[2] = {f->data[1] + 1, f->linesize[1], 2, cw, ch, w / sx, h / sy};
  } else {
    for (int p = 1; p < 3; ++p) v.planes[p] = {f->data[p], f->linesize[p], 1, cw, ch, w / sx, h / sy};
  }
  v.color = color_transform_of(f);
  return v;
}

struct FrameDeleter {
  void operator()(AVFrame* f) const { av_frame_free(&f); }
};
using FramePtr = std::unique_ptr<AVFrame, FrameDeleter>;

struct SwsDeleter {
  void operator()(SwsContext* c) const { sws_freeContext(c); }
};

// libswscale state of one conversion thread, for the native-size uint8 path.
struct ThreadSws {
  std::unique_ptr<SwsContext, SwsDeleter> ctx;
  int colorspace = -1, full_range = -1;
  std::vector<uint8_t> padded;  // for widths libswscale's SIMD converters would leave a tail of
};

// One demuxer + decoder over the file, and where it stands.
struct Decoder {
  AVFormatContext* fmt = nullptr;
  AVCodecContext* codec = nullptr;
  AVPacket* packet = nullptr;
  AVFrame* frame = nullptr;
  SwsContext* sws = nullptr;  // pixel formats the kernels do not read -> GBRP
  bool positioned = false;    // next_packet / next_frame are valid
  bool held_packet = false;   // packet holds the next packet to send
  bool demux_eof = false;
  bool verify_next = false;   // check the first frame after a seek
  bool primed = false;        // has decoded the stream's first packet
  int64_t next_packet = 0;    // decode index of the next packet to send
  int64_t next_frame = 0;     // index of the next frame the decoder outputs
  int64_t decode_errors = 0;
  std::vector<uint8_t> sent_skipped;  // frames whose packets were sent with AVDISCARD_NONREF since the last seek
  SeekPoint last_seek{0, 0};

  Decoder() {
    packet = av_packet_alloc();
    frame = av_frame_alloc();
    TORCH_CHECK(packet && frame, "VideoReader: out of memory");
  }
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;
  ~Decoder() { close(); }
  void close() {
    if (codec) avcodec_free_context(&codec);
    if (fmt) avformat_close_input(&fmt);
    if (packet) av_packet_free(&packet);
    if (frame) av_frame_free(&frame);
    if (sws) sws_freeContext(sws);
    sws = nullptr;
  }
};

struct Pending {
  FramePtr frame;
  size_t target;
};

// The part of a request one decoder handles.
struct Work {
  std::vector<size_t> targets;  // positions in Request::targets, ascending
  std::vector<Pending> pending;
  std::vector<int64_t> missing;
  int64_t batch = 1;    // frames converted together
  bool serial = false;  // convert on the calling thread (decoders or FFmpeg's frame threads run in parallel)
  ThreadSws sws;
  int failure = 0;  // 1: decoded order is not pts order, 2: bad seek point
  SeekPoint bad_seek{0, 0};
  std::exception_ptr error;
};

}  // namespace

class VideoReader : public torch::CustomClassHolder {
 public:
  // read_all_packets: list the packets by reading them even where the sample index could be used (for tests).
  VideoReader(std::string path, int64_t cuda_device, int64_t threads, bool read_all_packets)
      : path_(std::move(path)), cuda_device_(cuda_device), threads_(threads) {
    TORCH_CHECK_VALUE(threads >= 0, "threads: expected 0 (automatic) or a positive count; got ", threads);
    try {
      open_input(main_);
      index_used_ = !read_all_packets && packets_from_index(main_);
      if (!index_used_) read_packets(main_);
      plan_from_packets();
      open_decoder(main_, static_cast<int>(threads_), cuda_device_ >= 0);
    } catch (...) {
      close();
      throw;
    }
  }

  ~VideoReader() override { close(); }

  int64_t num_frames() const { return num_frames_; }
  int64_t width() const { return stream()->codecpar->width; }
  int64_t height() const { return stream()->codecpar->height; }
  std::string codec() const { return avcodec_get_name(stream()->codecpar->codec_id); }
  std::string pixel_format() const {
    const char* name = av_get_pix_fmt_name(static_cast<AVPixelFormat>(stream()->codecpar->format));
    return name ? name : "unknown";
  }
  std::string decode_device() const { return cuda_device_ >= 0 && hw_device_ ? "cuda" : "cpu"; }
  std::vector<int64_t> keyframes() const { return keyframes_; }
  std::string scan_error() const { return scan_error_; }
  bool index_used() const { return index_used_; }
  // How many decoders took the last request (1: one decoder with FFmpeg's threads; more: GOP-parallel).
  int64_t decoders_used() const { return decoders_used_; }
  // First frame of every seek point (frames decoding may start at), ascending.
  std::vector<int64_t> seek_frames() const {
    std::vector<int64_t> out;
    for (const auto& sp : seek_points_) out.push_back(sp.frame);
    return out;
  }

  double fps() const {
    const AVStream* s = stream();
    for (AVRational r : {s->avg_frame_rate, s->r_frame_rate}) {
      if (r.num > 0 && r.den > 0) return av_q2d(r);
    }
    const double d = duration();
    return d > 0 ? static_cast<double>(num_frames_) / d : 0.0;
  }

  // Seconds from the first to the end of the last frame in presentation order.
  double duration() const {
    if (frame_keys_.empty() || !keys_known_) return 0.0;
    const double tb = av_q2d(stream()->time_base);
    int64_t last_duration = 0;
    for (const auto& p : packets_) {
      if (p.has_frame && key_of(p) == frame_keys_.back()) last_duration = p.duration;
    }
    return static_cast<double>(frame_keys_.back() - frame_keys_.front() + last_duration) * tb;
  }

  // Presentation time of every frame in seconds, relative to the first frame.
  at::Tensor timestamps() const {
    auto out = at::empty({num_frames_}, at::kDouble);
    const double tb = av_q2d(stream()->time_base);
    const double f = fps();
    for (int64_t i = 0; i < num_frames_; ++i) {
      out[i] = keys_known_ ? static_cast<double>(frame_keys_[i] - frame_keys_[0]) * tb : (f > 0 ? i / f : 0.0);
    }
    return out;
  }

  at::Tensor get_frames(const at::Tensor& indices, int64_t height, int64_t width, const std::string& layout,
                        at::ScalarType dtype, std::vector<double> mean, std::vector<double> stdev, bool partial) {
    VIDFAST_NVTX_RANGE("decode/get_frames");
    TORCH_CHECK(main_.fmt && main_.codec, "VideoReader: the reader is closed");
    TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong && indices.dim() == 1,
                     "indices: expected a 1-D int64 tensor; got ", indices.scalar_type(), " of shape ", indices.sizes());
    TORCH_CHECK_VALUE(layout == "THWC" || layout == "CTHW", "layout: expected \"THWC\" or \"CTHW\"; got \"", layout,
                      "\"");
    TORCH_CHECK_TYPE(dtype == at::kByte || dtype == at::kFloat || dtype == at::kBFloat16,
                     "dtype: expected torch.uint8, torch.float32 or torch.bfloat16; got ", dtype);
    if (height == 0 && width == 0) {
      height = this->height();
      width = this->width();
    }
    TORCH_CHECK_VALUE(height > 0 && width > 0 && height <= 16384 && width <= 16384,
                      "size: expected (height, width) with both in [1, 16384]; got (", height, ", ", width, ")");
    const bool normalize = !mean.empty() || !stdev.empty();
    TORCH_CHECK_VALUE(!normalize || dtype != at::kByte,
                      "mean/std: normalization needs a floating dtype (torch.float32 or torch.bfloat16), not uint8");
    TORCH_CHECK_VALUE(!normalize || (mean.size() == 3 && stdev.size() == 3),
                      "mean/std: expected 3 values each (one per RGB channel); got ", mean.size(), " and ", stdev.size());
    OutputSpec spec{};
    spec.height = static_cast<int>(height);
    spec.width = static_cast<int>(width);
    spec.dtype = dtype;
    for (int c = 0; c < 3; ++c) {
      if (dtype == at::kByte) {
        spec.norm.scale[c] = 1.0f, spec.norm.bias[c] = 0.0f;
      } else if (normalize) {
        TORCH_CHECK_VALUE(std::isfinite(mean[c]), "mean: expected finite values; got ", mean);
        TORCH_CHECK_VALUE(std::isfinite(stdev[c]) && stdev[c] > 0, "std: expected finite positive values; got ",
                          stdev);
        spec.norm.scale[c] = static_cast<float>(1.0 / (255.0 * stdev[c]));
        spec.norm.bias[c] = static_cast<float>(-mean[c] / stdev[c]);
      } else {
        spec.norm.scale[c] = 1.0f / 255.0f, spec.norm.bias[c] = 0.0f;
      }
    }

    const auto idx = indices.contiguous();
    const int64_t n = idx.numel();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < num_frames_, "indices: frame ", ip[i], " is out of range for a video of ",
                        num_frames_, " frames");
    }
    const bool on_cuda = cuda_device_ >= 0;
    const at::Device device = on_cuda ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device_)) : at::kCPU;
    const bool thwc = layout == "THWC";
    const std::vector<int64_t> shape =
        thwc ? std::vector<int64_t>{n, height, width, 3} : std::vector<int64_t>{3, n, height, width};
    Request req;
    req.out = at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
    req.frame_dim = thwc ? 0 : 1;
    spec.stride_c = req.out.stride(thwc ? 3 : 0);
    spec.stride_y = req.out.stride(thwc ? 1 : 2);
    spec.stride_x = req.out.stride(thwc ? 2 : 3);
    req.spec = spec;
    if (n == 0) return req.out;

    // Plan: requested frames sorted and de-duplicated; each remembers the output slots it fills.
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
    for (int64_t k = 0; k < n; ++k) {
      if (req.targets.empty() || req.targets.back() != ip[order[k]]) {
        req.targets.push_back(ip[order[k]]);
        req.slots.emplace_back();
      }
      req.slots.back().push_back(order[k]);
    }
    req.wanted.assign(num_frames_, 0);
    for (int64_t t : req.targets) req.wanted[t] = 1;

    const std::vector<int64_t> missing = decode_request(req);
    if (!missing.empty()) {
      TORCH_CHECK(partial, "VideoReader: frame ", missing.front(), " of '", path_,
                  "' could not be decoded: the stream ended or broke before it (", missing.size(),
                  " requested frame(s) missing", scan_error_.empty() ? "" : ", demuxer error: " + scan_error_,
                  "). Pass partial=True to get the frames that decode.");
    }
    // Duplicated indices: copy the decoded slot into the others.
    for (size_t j = 0; j < req.targets.size(); ++j) {
      if (std::binary_search(missing.begin(), missing.end(), req.targets[j])) continue;
      for (size_t k = 1; k < req.slots[j].size(); ++k) {
        req.out.select(req.frame_dim, req.slots[j][k]).copy_(req.out.select(req.frame_dim, req.slots[j][0]));
      }
    }
    if (!missing.empty()) {  // partial: keep the slots that decoded, in request order
      std::vector<int64_t> keep;
      for (int64_t i = 0; i < n; ++i) {
        if (!std::binary_search(missing.begin(), missing.end(), ip[i])) keep.push_back(i);
      }
      TORCH_WARN("VideoReader: ", missing.size(), " requested frame(s) of '", path_,
                 "' could not be decoded and are left out of the result");
      return req.out.index_select(req.frame_dim, at::tensor(keep, at::kLong).to(device));
    }
    return req.out;
  }

  void close() {
    main_.close();
    workers_.clear();
    if (hw_device_) av_buffer_unref(&hw_device_);
    thread_sws_.clear();
  }

 private:
  struct Request {
    at::Tensor out, cpu_staging;
    int64_t frame_dim = 0;
    OutputSpec spec{};
    std::vector<int64_t> targets;             // sorted, unique
    std::vector<std::vector<int64_t>> slots;  // output positions of each target
    std::vector<uint8_t> wanted;              // per frame of the video
  };

  // Cuts runs (frames to decode each) into at most `parts` contiguous groups with the smallest largest group, and
  // returns how many groups (group_of_run[r] says which). Where the codec has frame threads and the largest group
  // would hold much more than an equal share, returns 1: one decoder with FFmpeg's frame threads keeps every core
  // busy. (Measured on 2 cores, H.264: two single-threaded decoders on halves of the work take about 30 % less time
  // than one decoder with frame threads on all of it.)
  static int64_t balanced_groups(const std::vector<int64_t>& run_frames, int64_t parts, bool frame_threads,
                                 std::vector<int64_t>* group_of_run) {
    int64_t total = 0, largest_run = 0;
    for (int64_t f : run_frames) total += f, largest_run = std::max(largest_run, f);
    auto groups_needed = [&](int64_t cap) {
      int64_t groups = 1, load = 0;
      for (int64_t f : run_frames) {
        if (load + f > cap) ++groups, load = 0;
        load += f;
      }
      return groups;
    };
    int64_t lo = largest_run, hi = total;  // smallest cap that needs at most `parts` groups
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (groups_needed(mid) <= parts) hi = mid; else lo = mid + 1;
    }
    if (frame_threads && lo * parts * 10 > total * 14) return 1;
    int64_t group = 0, load = 0;
    for (size_t r = 0; r < run_frames.size(); ++r) {
      if (load + run_frames[r] > lo) ++group, load = 0;
      load += run_frames[r];
      (*group_of_run)[r] = group;
    }
    return group + 1;
  }

  // Decodes every target of the request; returns the frames that could not be decoded (sorted). Targets are cut
  // into runs that start decoding at the same seek point. With several runs and threads to spare, the runs are cut
  // into contiguous groups of about equal decoding work that single-threaded decoders take in parallel (codecs
  // without frame threads, such as MPEG-4 part 2, gain the most); where no such cut is balanced (one run holds
  // most of the work), one decoder with FFmpeg's own threads takes them all.
  std::vector<int64_t> decode_request(Request& req) {
    const int64_t torch_threads = at::get_num_threads();
    if (static_cast<int64_t>(thread_sws_.size()) < torch_threads) thread_sws_.resize(torch_threads);
    while (true) {
      std::vector<size_t> run_start;  // first target position of each run
      std::vector<int64_t> run_frames;  // frames each run decodes
      for (size_t j = 0; j < req.targets.size(); ++j) {
        const SeekPoint sp = seek_point_before(req.targets[j]);
        if (j == 0 || sp.frame != seek_point_before(req.targets[j - 1]).frame) {
          run_start.push_back(j);
          run_frames.push_back(0);
        }
        run_frames.back() = req.targets[j] - sp.frame + 1;
      }
      const int64_t threads = threads_ > 0 ? std::min(threads_, torch_threads) : torch_threads;
      std::vector<int64_t> group_of_run(run_frames.size(), 0);
      int64_t parallel = 1;
      if (cuda_device_ < 0 && threads > 1 && run_frames.size() > 1) {
        const bool frame_threads = (main_.codec->codec->capabilities & AV_CODEC_CAP_FRAME_THREADS) != 0;
        parallel = balanced_groups(run_frames, threads, frame_threads, &group_of_run);
      }
      decoders_used_ = parallel;
      std::vector<Work> works(parallel);
      if (parallel == 1) {
        for (size_t j = 0; j < req.targets.size(); ++j) works[0].targets.push_back(j);
        // With FFmpeg's frame threads busy on every core, converting on this thread (while they decode the
        // packets already sent) beats splitting each conversion over torch's threads: about 10 % less time per
        // request on 2 cores shared with other jobs (not measured on a quiet machine), and no loss where
        // conversion dominates (every frame at native size).
        works[0].serial = (main_.codec->active_thread_type & FF_THREAD_FRAME) != 0;
        works[0].batch = works[0].serial ? 1 : torch_threads;
        run_work(main_, req, works[0]);
      } else {
        for (size_t r = 0; r < run_start.size(); ++r) {
          const size_t end = r + 1 < run_start.size() ? run_start[r + 1] : req.targets.size();
          for (size_t j = run_start[r]; j < end; ++j) works[group_of_run[r]].targets.push_back(j);
        }
        if (static_cast<int64_t>(workers_.size()) < parallel) workers_.resize(parallel);
        for (auto& w : works) w.serial = true;
        at::parallel_for(0, parallel, 1, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            try {  // each thread opens its own decoder (in parallel with the others)
              if (!workers_[k]) {
                auto d = std::make_unique<Decoder>();
                open_input(*d);
                open_decoder(*d, 1, false);
                workers_[k] = std::move(d);
              }
            } catch (...) {
              works[k].error = std::current_exception();
              continue;
            }
            run_work(*workers_[k], req, works[k]);
          }
        });
      }
      bool retry = false;
      for (auto& w : works) {
        if (w.error) std::rethrow_exception(w.error);
        if (w.failure == 1) skip_nonref_ = false;  // identify frames by counting from now on
        if (w.failure == 2) {
          seek_points_.erase(std::remove_if(seek_points_.begin(), seek_points_.end(),
                                            [&](const SeekPoint& sp) { return sp.packet == w.bad_seek.packet; }),
                             seek_points_.end());
        }
        retry = retry || w.failure != 0;
      }
      if (retry) {
        main_.positioned = false;
        for (auto& d : workers_) d->positioned = false;
        continue;
      }
      std::vector<int64_t> missing;
      for (auto& w : works) missing.insert(missing.end(), w.missing.begin(), w.missing.end());
      std::sort(missing.begin(), missing.end());
      return missing;
    }
  }

  void run_work(Decoder& d, Request& req, Work& w) {
    try {
      run_plan(d, req, w);
    } catch (const PtsOrderMismatch&) {
      w.failure = 1;
    } catch (const BadSeekPoint&) {
      w.failure = 2;
      w.bad_seek = d.last_seek;
    } catch (...) {
      w.error = std::current_exception();
    }
    if (w.failure || w.error) w.pending.clear();
  }

  const AVStream* stream() const {
    TORCH_CHECK(main_.fmt, "VideoReader: the reader is closed");
    return main_.fmt->streams[stream_index_];
  }
  // Presentation key of a packet: its pts where the container gives every packet one, else its dts.
  int64_t key_of(const PacketInfo& p) const { return all_pts_ ? p.pts : p.dts; }

  // Opens the file in d. The main decoder probes the streams (FFmpeg decodes a few frames for that) and picks
  // the video stream; the parallel decoders take its stream and skip the probing where packets do not depend on
  // it (MP4/MOV: every packet comes from the sample index read with the header).
  void open_input(Decoder& d) {
    const bool is_main = &d == &main_;
    int ret = avformat_open_input(&d.fmt, path_.c_str(), nullptr, nullptr);
    TORCH_CHECK_VALUE(ret >= 0, "path: cannot open '", path_, "' as a video: ", av_error_text(ret));
    if (is_main || std::strncmp(d.fmt->iformat->name, "mov,", 4) != 0) {
      ret = avformat_find_stream_info(d.fmt, nullptr);
      TORCH_CHECK_VALUE(ret >= 0, "path: cannot read stream information from '", path_, "': ", av_error_text(ret));
    }
    if (is_main) {
      ret = av_find_best_stream(d.fmt, AVMEDIA_TYPE_VIDEO, -1, -1, nullptr, 0);
      TORCH_CHECK_VALUE(ret >= 0, "path: '", path_, "' has no video stream");
      stream_index_ = ret;
    }
    TORCH_CHECK(stream_index_ < static_cast<int>(d.fmt->nb_streams), "VideoReader: '", path_,
                "' changed since it was opened");
    for (unsigned i = 0; i < d.fmt->nb_streams; ++i) {
      d.fmt->streams[i]->discard = static_cast<int>(i) == stream_index_ ? AVDISCARD_DEFAULT : AVDISCARD_ALL;
    }
  }

  // What the packet scan records of a packet (the IDR test reads its bytes).
  PacketInfo packet_info(const AVPacket* pkt) const {
    const bool has_frame = pkt->size > 0 && !(pkt->flags & AV_PKT_FLAG_DISCARD);
    const bool key = (pkt->flags & AV_PKT_FLAG_KEY) != 0;
    return {pkt->pts, pkt->dts, pkt->pos, pkt->duration, key, key && safe_start_bytes(pkt->data, pkt->size),
            has_frame};
  }

  // Whether a keyframe holding these bytes is a safe start: for H.264 / HEVC only IDR pictures.
  bool safe_start_bytes(const uint8_t* data, int size) const {
    const AVCodecParameters* par = stream()->codecpar;
    if (par->codec_id != AV_CODEC_ID_H264 && par->codec_id != AV_CODEC_ID_HEVC) return true;
    return has_idr_nal(data, size, nal_length_size(par), par->codec_id == AV_CODEC_ID_HEVC);
  }

  // Lists the video packets by reading every packet of the file (no decoding).
  void read_packets(Decoder& d) {
    VIDFAST_NVTX_RANGE("decode/scan");
    int ret;
    while ((ret = av_read_frame(d.fmt, d.packet)) >= 0) {
      if (d.packet->stream_index == stream_index_) packets_.push_back(packet_info(d.packet));
      av_packet_unref(d.packet);
    }
    if (ret != AVERROR_EOF) scan_error_ = av_error_text(ret);
  }

  // Lists the video packets of an MP4/MOV file from the demuxer's sample index: each index entry is the packet
  // av_read_frame returns (dts = entry timestamp, pos, size, keyframe and discard flags), and pts = dts + a
  // constant shift + the sample's composition offset from the track's 'ctts' table, which the index does not
  // keep. Only the keyframes' bytes are read (IDR test). Everything is checked: the index must map one to one
  // onto the track's samples (same count and sizes, no fragments, every sample inside the file), and the packets
  // av_read_frame returns at the start and over the last GOP must match the entries exactly. Returns false
  // (packets_ empty, demuxer back at the start) where any check fails: then every packet is read.
  bool packets_from_index(Decoder& d) {
    VIDFAST_NVTX_RANGE("decode/index");
    if (std::strncmp(d.fmt->iformat->name, "mov,", 4) != 0) return false;
    if (index_packets(d)) return true;
    packets_.clear();
    avformat_close_input(&d.fmt);
    open_input(d);
    return false;
  }

  bool index_packets(Decoder& d) {
    AVStream* st = d.fmt->streams[stream_index_];
    const int64_t n = avformat_index_get_entries_count(st);
    if (n <= 0) return false;
    Mp4Track track;
    if (!read_mp4_track(d.fmt->pb, st->id, &track)) return false;
    if (static_cast<int64_t>(track.sizes.size()) != n) return false;
    if (!track.offsets.empty() && static_cast<int64_t>(track.offsets.size()) != n) return false;
    const int64_t file_size = avio_size(d.fmt->pb);
    if (file_size <= 0) return false;
    packets_.resize(n);
    for (int64_t k = 0; k < n; ++k) {
      const AVIndexEntry* e = avformat_index_get_entry(st, static_cast<int>(k));
      if (!e || e->size != static_cast<int>(track.sizes[k]) || e->pos < 0 || e->pos + e->size > file_size) {
        return false;
      }
      const bool key = (e->flags & AVINDEX_KEYFRAME) != 0;
      const bool has_frame = e->size > 0 && !(e->flags & AVINDEX_DISCARD_FRAME);
      // pts without the constant shift for now (found below from a real packet); duration unknown (0).
      const int64_t offset = track.offsets.empty() ? 0 : track.offsets[k];
      packets_[k] = {e->timestamp + offset, e->timestamp, e->pos, 0, key, false, has_frame};
    }
    // The first packets and the last GOP through the demuxer: they must be the index's entries, with one pts
    // shift for all, and the demuxer must end where the index does.
    int64_t shift = 0;
    bool shift_known = false;
    std::vector<uint8_t> checked(n, 0);
    auto check = [&](int64_t k) {
      PacketInfo got = packet_info(d.packet);
      PacketInfo& want = packets_[k];
      if (!shift_known) {
        if (got.pts == kNoTs) return false;
        shift = got.pts - want.pts, shift_known = true;
      }
      want.pts += shift;
      if (got.pts != want.pts || got.dts != want.dts || got.pos != want.pos || got.key != want.key ||
          got.has_frame != want.has_frame || d.packet->size != avformat_index_get_entry(st, k)->size) {
        return false;
      }
      want.duration = got.duration;
      want.safe_start = got.safe_start;
      checked[k] = 1;
      return true;
    };
    // Keyframes' bytes are read straight from the file below: the demuxer must not change them (no decryption).
    auto file_bytes = [&](int64_t k, std::vector<uint8_t>* bytes) {
      const AVIndexEntry* e = avformat_index_get_entry(st, static_cast<int>(k));
      bytes->resize(e->size);
      return avio_seek(d.fmt->pb, e->pos, SEEK_SET) == e->pos &&
             avio_read(d.fmt->pb, bytes->data(), e->size) == e->size;
    };
    std::vector<uint8_t> bytes;
    if (!file_bytes(0, &bytes)) return false;
    const int64_t head = std::min<int64_t>(n, 64);
    for (int64_t k = 0; k < head; ++k) {
      if (!read_packet(d, stream_index_)) return false;
      const bool ok = check(k) && (k > 0 || (d.packet->size == static_cast<int>(bytes.size()) &&
                                             std::memcmp(d.packet->data, bytes.data(), bytes.size()) == 0));
      av_packet_unref(d.packet);
      if (!ok) return false;
    }
    int64_t from = head;  // the entry the demuxer returns next
    int64_t tail = n - 1;
    while (tail > head && !packets_[tail].key) --tail;
    if (tail > head) {  // jump to the last keyframe (the seek lands on the keyframe at or before its dts)
      if (av_seek_frame(d.fmt, stream_index_, packets_[tail].dts, AVSEEK_FLAG_BACKWARD) < 0) return false;
      bool found = false;
      while (!found && read_packet(d, stream_index_)) {
        found = d.packet->pos == packets_[tail].pos && d.packet->dts == packets_[tail].dts;
        const bool ok = !found || check(tail);
        av_packet_unref(d.packet);
        if (!ok) return false;
      }
      if (!found) return false;
      from = tail + 1;
    }
    for (int64_t k = from; k < n; ++k) {
      if (!read_packet(d, stream_index_)) return false;
      const bool ok = check(k);
      av_packet_unref(d.packet);
      if (!ok) return false;
    }
    if (read_packet(d, stream_index_)) {  // more packets than entries
      av_packet_unref(d.packet);
      return false;
    }
    // Entries between the two read ranges: the same pts shift; keyframes' bytes read for the IDR test.
    for (int64_t k = 0; k < n; ++k) {
      PacketInfo& p = packets_[k];
      if (checked[k]) continue;
      p.pts += shift;
      if (!p.key) continue;
      if (!file_bytes(k, &bytes)) return false;
      p.safe_start = safe_start_bytes(bytes.data(), static_cast<int>(bytes.size()));
    }
    // The last frame in presentation order needs its packet's duration (read above unless the GOPs are open).
    int64_t last = -1;
    for (int64_t k = 0; k < n; ++k) {
      if (packets_[k].has_frame && (last < 0 || packets_[k].pts >= packets_[last].pts)) last = k;
    }
    return last >= 0 && checked[last];
  }

  // Sorts the listed packets into frames, and finds keyframes and seek points.
  void plan_from_packets() {
    // Presentation order: frames sorted by pts. Without a pts on every packet (AVI), frames are taken in decode
    // order, which is presentation order only for streams without reordering (B-frames).
    all_pts_ = true;
    for (const auto& p : packets_) all_pts_ = all_pts_ && (!p.has_frame || p.pts != kNoTs);
    keys_known_ = true;
    std::vector<int64_t> frame_packets;
    for (size_t d = 0; d < packets_.size(); ++d) {
      if (!packets_[d].has_frame) continue;
      frame_packets.push_back(static_cast<int64_t>(d));
      keys_known_ = keys_known_ && key_of(packets_[d]) != kNoTs;
    }
    const bool order_known = all_pts_ || stream()->codecpar->video_delay == 0;
    num_frames_ = static_cast<int64_t>(frame_packets.size());
    TORCH_CHECK_VALUE(num_frames_ > 0, "path: '", path_, "' has a video stream with no frames",
                      scan_error_.empty() ? "" : " (" + scan_error_ + ")");
    if (keys_known_) {
      std::stable_sort(frame_packets.begin(), frame_packets.end(),
                       [&](int64_t a, int64_t b) { return key_of(packets_[a]) < key_of(packets_[b]); });
    }
    frame_of_packet_.assign(packets_.size(), -1);
    frame_keys_.resize(num_frames_);
    for (int64_t i = 0; i < num_frames_; ++i) {
      const PacketInfo& p = packets_[frame_packets[i]];
      frame_of_packet_[frame_packets[i]] = i;
      frame_keys_[i] = key_of(p);
      if (p.key) keyframes_.push_back(i);
    }
    const bool unique_pts = std::adjacent_find(frame_keys_.begin(), frame_keys_.end()) == frame_keys_.end();

    // Seek points: the start, and keyframes before which only earlier frames and after which only later frames
    // are decoded (closed GOPs), so decoding from there yields exactly the frames of a full decode.
    seek_points_.push_back({0, 0});
    if (keys_known_ && order_known) {
      const int64_t n = static_cast<int64_t>(packets_.size());
      std::vector<int64_t> suffix_min(n + 1, std::numeric_limits<int64_t>::max());
      for (int64_t d = n - 1; d >= 0; --d) {
        suffix_min[d] = packets_[d].has_frame ? std::min(suffix_min[d + 1], key_of(packets_[d])) : suffix_min[d + 1];
      }
      int64_t prefix_max = std::numeric_limits<int64_t>::min(), frames_before = 0;
      for (int64_t d = 0; d < n; ++d) {
        const PacketInfo& p = packets_[d];
        if (d > 0 && p.safe_start && p.has_frame && prefix_max < key_of(p) && suffix_min[d] >= key_of(p) &&
            (p.dts != kNoTs || p.pts != kNoTs)) {
          seek_points_.push_back({d, frames_before});
        }
        if (p.has_frame) {
          prefix_max = std::max(prefix_max, key_of(p));
          ++frames_before;
        }
      }
    }
    // Skipping non-reference frames identifies decoded frames by pts; the codecs below mark non-reference
    // pictures in the bitstream, so skipping them changes no other picture.
    const AVCodecID id = stream()->codecpar->codec_id;
    const bool codec_ok = id == AV_CODEC_ID_H264 || id == AV_CODEC_ID_HEVC || id == AV_CODEC_ID_MPEG4 ||
                          id == AV_CODEC_ID_MPEG2VIDEO || id == AV_CODEC_ID_MPEG1VIDEO;
    skip_nonref_ = keys_known_ && all_pts_ && unique_pts && codec_ok;
  }

  void open_decoder(Decoder& d, int threads, bool cuda) {
    const AVCodecParameters* par = stream()->codecpar;
    const AVCodec* decoder = avcodec_find_decoder(par->codec_id);
    TORCH_CHECK_NOT_IMPLEMENTED(decoder, "VideoReader: no decoder for codec '", avcodec_get_name(par->codec_id),
                                "' of '", path_, "' in this FFmpeg build");
    d.codec = avcodec_alloc_context3(decoder);
    TORCH_CHECK(d.codec, "VideoReader: out of memory");
    int ret = avcodec_parameters_to_context(d.codec, par);
    TORCH_CHECK(ret >= 0, "VideoReader: bad codec parameters in '", path_, "': ", av_error_text(ret));
    d.codec->pkt_timebase = stream()->time_base;
    d.codec->thread_count = threads;
    d.codec->thread_type = FF_THREAD_FRAME | FF_THREAD_SLICE;
    if (cuda) setup_cuda(d, decoder);
    ret = avcodec_open2(d.codec, decoder, nullptr);
    TORCH_CHECK_NOT_IMPLEMENTED(ret >= 0, "VideoReader: cannot open the '", decoder->name, "' decoder for '", path_,
                                "': ", av_error_text(ret));
  }

  void setup_cuda(Decoder& d, const AVCodec* decoder) {
#if defined(VIDFAST_WITH_CUDA)
    const auto fmt = static_cast<AVPixelFormat>(stream()->codecpar->format);
    const bool h264_not_420 = decoder->id == AV_CODEC_ID_H264 && fmt != AV_PIX_FMT_YUV420P &&
                              fmt != AV_PIX_FMT_YUVJ420P && fmt != AV_PIX_FMT_NONE;
    if (h264_not_420) {
      TORCH_WARN("VideoReader: NVDEC cannot decode H.264 ", pixel_format(), " ('", path_,
                 "'); decoding on the CPU and copying the frames to the GPU");
      return;
    }
    std::string error;
    hw_device_ = create_cuda_device(static_cast<int>(cuda_device_), &error);
    if (!hw_device_) {
      TORCH_WARN("VideoReader: cannot use NVDEC (", error, "); decoding on the CPU and copying the frames to the GPU");
      return;
    }
    d.codec->hw_device_ctx = av_buffer_ref(hw_device_);
    d.codec->get_format = pick_cuda_format;
    d.codec->thread_count = 1;  // NVDEC decodes asynchronously itself
#else
    (void)decoder;
    TORCH_CHECK(false, "device: this build of pyvidfast has no CUDA kernels; use device=\"cpu\"");
#endif
  }

  // Back to the start without trusting the container's seeking: reopen the file.
  void reopen(Decoder& d) {
    avformat_close_input(&d.fmt);
    open_input(d);
    avcodec_flush_buffers(d.codec);
    d.next_packet = 0;
    d.held_packet = false;
    d.demux_eof = false;
  }

  // Reads the next packet of the video stream into d.packet; false at the end (or a read error: truncated file).
  static bool read_packet(Decoder& d, int stream_index) {
    while (true) {
      const int ret = av_read_frame(d.fmt, d.packet);
      if (ret < 0) return false;
      if (d.packet->stream_index == stream_index) return true;
      av_packet_unref(d.packet);
    }
  }

  // Cuts a length-prefixed H.264 packet down to its NAL units that are not coded slices (parameter sets, SEI);
  // false where there are none. Annex B packets are left whole (true).
  bool keep_h264_headers(AVPacket* pkt) const {
    const int nal_length = nal_length_size(stream()->codecpar);
    if (nal_length == 0) return true;
    TORCH_CHECK(av_packet_make_writable(pkt) >= 0, "VideoReader: out of memory");
    int kept = 0;
    for (int at = 0; at + nal_length < pkt->size;) {
      int64_t len = 0;
      for (int b = 0; b < nal_length; ++b) len = (len << 8) | pkt->data[at + b];
      if (len <= 0 || at + nal_length + len > pkt->size) break;
      const int unit = nal_length + static_cast<int>(len);
      const int type = pkt->data[at + nal_length] & 0x1f;
      if (type < 1 || type > 5) {  // 1..5: coded slices
        std::memmove(pkt->data + kept, pkt->data + at, unit);
        kept += unit;
      }
      at += unit;
    }
    std::memset(pkt->data + kept, 0, pkt->size - kept);
    pkt->size = kept;
    return kept > 0;
  }

  static bool same_packet(const Decoder& d, const PacketInfo& p) {
    return d.packet->pts == p.pts && d.packet->dts == p.dts && d.packet->pos == p.pos;
  }

  // Positions the demuxer on packet sp.packet (held in d.packet) with a flushed decoder.
  void seek_to(Decoder& d, const SeekPoint& sp) {
    VIDFAST_NVTX_RANGE("decode/seek");
    if (!d.primed && sp.packet > 0) {
      // Decoders learn from the stream's first packet things that later packets rely on and a flush keeps (for
      // H.264, the x264 build in its SEI, which switches on workarounds for old encoder bugs: without it, 4:4:4
      // streams from old x264 decode to garbage after a seek). Send it once before the first seek elsewhere; of
      // length-prefixed H.264 only its parameter sets and SEI (no picture to decode).
      seek_to(d, {0, 0});
      d.held_packet = false;
      const bool h264 = stream()->codecpar->codec_id == AV_CODEC_ID_H264;
      if (!h264 || keep_h264_headers(d.packet)) {
        // (H.264 reports a packet without a picture as an error unless non-reference pictures may be skipped.)
        d.codec->skip_frame = h264 ? AVDISCARD_NONREF : AVDISCARD_DEFAULT;
        if (avcodec_send_packet(d.codec, d.packet) >= 0) {
          while (avcodec_receive_frame(d.codec, d.frame) == 0) av_frame_unref(d.frame);
        }
      }
      av_packet_unref(d.packet);
    }
    d.primed = true;
    avcodec_flush_buffers(d.codec);
    d.held_packet = false;
    d.demux_eof = false;
    const PacketInfo& target = packets_[sp.packet];
    const int64_t ts = target.dts != kNoTs ? target.dts : target.pts;
    bool found = false;
    if (ts != kNoTs && av_seek_frame(d.fmt, stream_index_, ts, AVSEEK_FLAG_BACKWARD) >= 0) {
      while (read_packet(d, stream_index_)) {
        if (same_packet(d, target)) {
          found = true;
          break;
        }
        const bool past = (target.pos >= 0 && d.packet->pos > target.pos) ||
                          (target.dts != kNoTs && d.packet->dts != kNoTs && d.packet->dts > target.dts);
        av_packet_unref(d.packet);
        if (past) break;
      }
    }
    if (!found) {  // the container cannot seek there: reopen and walk the packets (demuxing only)
      reopen(d);
      for (int64_t k = 0; k <= sp.packet; ++k) {
        TORCH_CHECK(read_packet(d, stream_index_), "VideoReader: '", path_, "' changed since it was opened");
        if (k < sp.packet) av_packet_unref(d.packet);
      }
    }
    d.held_packet = true;
    d.next_packet = sp.packet;
    d.next_frame = sp.frame;
    d.verify_next = sp.packet > 0;
    d.last_seek = sp;
    d.sent_skipped.assign(num_frames_, 0);
    d.positioned = true;
  }

  // Decodes until the next frame comes out (in d.frame) and returns its index, or -1 at the end of the stream.
  int64_t next_decoded_frame(Decoder& d, const Request& req) {
    while (true) {
      int ret = avcodec_receive_frame(d.codec, d.frame);
      if (ret == 0) return identify(d, d.frame);
      if (ret == AVERROR_EOF) {
        d.positioned = false;
        return -1;
      }
      if (ret != AVERROR(EAGAIN)) {  // a broken picture (frame threads report it here): skip it, as players do
        TORCH_CHECK(++d.decode_errors < 10000, "VideoReader: decoding '", path_, "' keeps failing: ",
                    av_error_text(ret));
        continue;
      }
      if (d.demux_eof) {
        d.positioned = false;
        return -1;
      }
      if (!d.held_packet && !read_packet(d, stream_index_)) {
        d.demux_eof = true;
        avcodec_send_packet(d.codec, nullptr);  // drain the frames the decoder still holds
        continue;
      }
      d.held_packet = false;
      const int64_t k = d.next_packet++;
      const bool known = k < static_cast<int64_t>(packets_.size());
      if (d.packet->size == 0) {  // an empty packet would read as "drain"; it carries no picture
        av_packet_unref(d.packet);
        continue;
      }
      const int64_t f = known ? frame_of_packet_[k] : -1;
      const bool skippable = skip_nonref_ && (f < 0 || !req.wanted[f]);
      d.codec->skip_frame = skippable ? AVDISCARD_NONREF : AVDISCARD_DEFAULT;
      if (skippable && f >= 0) d.sent_skipped[f] = 1;
      ret = avcodec_send_packet(d.codec, d.packet);
      av_packet_unref(d.packet);
      if (ret < 0 && ret != AVERROR(EAGAIN)) ++d.decode_errors;  // a corrupt packet: go on, as players do
    }
  }

  int64_t identify(Decoder& d, const AVFrame* f) {
    if (!skip_nonref_) {
      // The first frame after a seek must be the one the scan expects there (pts being known).
      if (d.verify_next && all_pts_ && f->pts != frame_keys_[d.next_frame]) throw BadSeekPoint{};
      d.verify_next = false;
      return d.next_frame++;
    }
    // Frames are identified by pts; every frame between the last one and this one must have been allowed to be
    // skipped, else the decoder's order is not the pts order.
    const auto it = std::lower_bound(frame_keys_.begin(), frame_keys_.end(), f->pts);
    if (f->pts == kNoTs || it == frame_keys_.end() || *it != f->pts) throw PtsOrderMismatch{};
    const int64_t i = it - frame_keys_.begin();
    if (i < d.next_frame) throw PtsOrderMismatch{};
    for (int64_t k = d.next_frame; k < i; ++k) {
      if (!d.sent_skipped[k]) throw PtsOrderMismatch{};
    }
    d.next_frame = i + 1;
    return i;
  }

  SeekPoint seek_point_before(int64_t frame) const {
    auto it = std::upper_bound(seek_points_.begin(), seek_points_.end(), frame,
                               [](int64_t f, const SeekPoint& sp) { return f < sp.frame; });
    return *(it - 1);
  }

  // Decodes the targets w.targets (ascending) with decoder d.
  void run_plan(Decoder& d, Request& req, Work& w) {
    for (size_t n = 0; n < w.targets.size(); ++n) {
      const size_t j = w.targets[n];
      const int64_t t = req.targets[j];
      const SeekPoint sp = seek_point_before(t);
      // Seek only forward past packets we would otherwise decode, or when the decoder is behind the target.
      if (!d.positioned || t < d.next_frame || sp.packet > d.next_packet) seek_to(d, sp);
      while (true) {
        const int64_t i = next_decoded_frame(d, req);
        if (i < 0) {
          for (size_t k = n; k < w.targets.size(); ++k) w.missing.push_back(req.targets[w.targets[k]]);
          flush_conversions(req, w);
          return;
        }
        if (i < t) continue;  // decoded but not requested: never converted
        if (i > t) {  // only possible when frames are identified by pts
          TORCH_CHECK(skip_nonref_, "VideoReader: internal error: frame ", t, " was passed over");
          throw PtsOrderMismatch{};
        }
        enqueue_conversion(d, req, w, j);
        break;
      }
    }
    flush_conversions(req, w);
  }

  void enqueue_conversion(Decoder& d, Request& req, Work& w, size_t j) {
    const int64_t offset = req.slots[j][0] * req.out.stride(req.frame_dim);
#if defined(VIDFAST_WITH_CUDA)
    if (d.frame->format == AV_PIX_FMT_CUDA) {
      const auto* frames_ctx = reinterpret_cast<const AVHWFramesContext*>(d.frame->hw_frames_ctx->data);
      if (frames_ctx->sw_format == AV_PIX_FMT_NV12) {
        convert_nv12_cuda(d.frame, color_transform_of(d.frame), req.spec, req.out, offset);
        av_frame_unref(d.frame);
        return;
      }
    }
#endif
    FramePtr f(av_frame_alloc());
    TORCH_CHECK(f, "VideoReader: out of memory");
    if (d.frame->hw_frames_ctx) {  // a GPU format the CUDA kernel does not read (10-bit): bring it to the host
      const int ret = av_hwframe_transfer_data(f.get(), d.frame, 0);
      TORCH_CHECK(ret >= 0, "VideoReader: cannot copy a decoded frame to the host: ", av_error_text(ret));
      av_frame_copy_props(f.get(), d.frame);
      av_frame_unref(d.frame);
    } else {
      av_frame_move_ref(f.get(), d.frame);
    }
    int sx, sy;
    bool nv12;
    if (!direct_format(static_cast<AVPixelFormat>(f->format), &sx, &sy, &nv12) &&
        !swscale_path(f.get(), req.spec, req.frame_dim)) {
      f = to_gbrp(d, f.get());
    }
    w.pending.push_back({std::move(f), j});
    if (static_cast<int64_t>(w.pending.size()) >= w.batch) flush_conversions(req, w);
  }

  // Pixel formats the kernels do not read directly (10-bit, RGB, palettes, grey) go through libswscale to
  // planar 8-bit RGB at the native size first.
  FramePtr to_gbrp(Decoder& d, const AVFrame* src) {
    FramePtr dst(av_frame_alloc());
    TORCH_CHECK(dst, "VideoReader: out of memory");
    dst->format = AV_PIX_FMT_GBRP;
    dst->width = src->width;
    dst->height = src->height;
    TORCH_CHECK(av_frame_get_buffer(dst.get(), 0) >= 0, "VideoReader: out of memory");
    d.sws = sws_getCachedContext(d.sws, src->width, src->height, static_cast<AVPixelFormat>(src->format), src->width,
                                src->height, AV_PIX_FMT_GBRP, SWS_BILINEAR, nullptr, nullptr, nullptr);
    TORCH_CHECK_NOT_IMPLEMENTED(d.sws, "VideoReader: cannot convert pixel format ",
                                av_get_pix_fmt_name(static_cast<AVPixelFormat>(src->format)));
    sws_scale(d.sws, src->data, src->linesize, 0, src->height, dst->data, dst->linesize);
    return dst;
  }

  // libswscale context of one conversion thread, for the native-size uint8 path.
  // Native size, uint8, THWC: libswscale's own conversion, bit-exact with what PyAV and most tools return.
  static bool swscale_path(const AVFrame* f, const OutputSpec& spec, int64_t frame_dim) {
    return spec.dtype == at::kByte && frame_dim == 0 && f->width == spec.width && f->height == spec.height &&
           f->format != AV_PIX_FMT_GBRP;
  }

  void swscale_into(ThreadSws& t, const AVFrame* f, uint8_t* out, int64_t row_stride) {
    t.ctx.reset(sws_getCachedContext(t.ctx.release(), f->width, f->height, static_cast<AVPixelFormat>(f->format),
                                     f->width, f->height, AV_PIX_FMT_RGB24, SWS_BILINEAR, nullptr, nullptr, nullptr));
    TORCH_CHECK(t.ctx, "VideoReader: libswscale cannot convert pixel format ",
                av_get_pix_fmt_name(static_cast<AVPixelFormat>(f->format)));
    const int full = f->color_range == AVCOL_RANGE_JPEG ? 1 : 0;
    const int cs = f->colorspace == AVCOL_SPC_UNSPECIFIED ? SWS_CS_DEFAULT : static_cast<int>(f->colorspace);
    if (cs != t.colorspace || full != t.full_range) {
      const int* coefficients = sws_getCoefficients(cs);
      sws_setColorspaceDetails(t.ctx.get(), coefficients, full, coefficients, 1, 0, 1 << 16, 1 << 16);
      t.colorspace = cs, t.full_range = full;
    }
    // libswscale's x86 converters work in blocks of 16 pixels and skip the tail when the destination rows are
    // not padded to a block: convert into padded rows then.
    const int64_t padded_stride = ((f->width + 31) / 32) * 32 * 3;
    const bool direct = f->width % 32 == 0;
    if (!direct) t.padded.resize(static_cast<size_t>(padded_stride) * f->height);
    uint8_t* dst[4] = {direct ? out : t.padded.data(), nullptr, nullptr, nullptr};
    int dst_stride[4] = {static_cast<int>(direct ? row_stride : padded_stride), 0, 0, 0};
    sws_scale(t.ctx.get(), f->data, f->linesize, 0, f->height, dst, dst_stride);
    if (!direct) {
      for (int y = 0; y < f->height; ++y) {
        std::memcpy(out + y * row_stride, t.padded.data() + y * padded_stride, static_cast<size_t>(f->width) * 3);
      }
    }
  }

  // Converts the pending frames on the CPU, frames x bands of rows in parallel.
  void flush_conversions(Request& req, Work& w) {
    if (w.pending.empty()) return;
    VIDFAST_NVTX_RANGE("decode/convert");
    at::Tensor target = req.out;
    if (target.is_cuda()) {  // frames decoded in software for a CUDA result: convert on the host, copy later
      if (!req.cpu_staging.defined()) req.cpu_staging = at::empty_like(req.out, req.out.options().device(at::kCPU));
      target = req.cpu_staging;  // CUDA results come from one decoder, so this is not raced
    }
    const int64_t frames = static_cast<int64_t>(w.pending.size());
    const int64_t threads = w.serial ? 1 : static_cast<int64_t>(thread_sws_.size());
    const int64_t bands = std::max<int64_t>(1, (threads + frames - 1) / frames);
    const int64_t rows = req.spec.height;
    const int64_t band_rows = (rows + bands - 1) / bands;
    std::vector<PictureView> views;
    std::vector<uint8_t> use_sws;
    for (const auto& p : w.pending) {
      use_sws.push_back(swscale_path(p.frame.get(), req.spec, req.frame_dim));
      views.push_back(use_sws.back() ? PictureView{} : picture_view(p.frame.get()));
    }
    char* base = static_cast<char*>(target.data_ptr());
    const int64_t elem = target.element_size();
    const int64_t frame_stride = target.stride(req.frame_dim);
    auto convert = [&](int64_t item, ThreadSws& sws) {
      const int64_t f = item / bands, b = item % bands;
      char* out = base + req.slots[w.pending[f].target][0] * frame_stride * elem;
      if (use_sws[f]) {
        if (b == 0) swscale_into(sws, w.pending[f].frame.get(), reinterpret_cast<uint8_t*>(out), req.spec.stride_y);
        return;
      }
      const int r0 = static_cast<int>(std::min(rows, b * band_rows));
      const int r1 = static_cast<int>(std::min(rows, (b + 1) * band_rows));
      if (r0 < r1) convert_rows_cpu(views[f], req.spec, out, r0, r1);
    };
    if (w.serial) {
      for (int64_t item = 0; item < frames * bands; ++item) convert(item, w.sws);
    } else {
      at::parallel_for(0, frames * bands, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) convert(item, thread_sws_[at::get_thread_num()]);
      });
    }
    if (target.data_ptr() != req.out.data_ptr()) {
      for (const auto& p : w.pending) {
        const int64_t slot = req.slots[p.target][0];
        req.out.select(req.frame_dim, slot).copy_(target.select(req.frame_dim, slot));
      }
    }
    w.pending.clear();
  }


  std::string path_;
  int64_t cuda_device_;
  int64_t threads_;
  AVBufferRef* hw_device_ = nullptr;
  Decoder main_;  // scans the file; decodes with FFmpeg's threads (or NVDEC)
  std::vector<std::unique_ptr<Decoder>> workers_;  // single-threaded decoders for GOP-parallel requests
  std::vector<ThreadSws> thread_sws_;
  int stream_index_ = -1;

  // From the scan.
  std::vector<PacketInfo> packets_;
  std::vector<int64_t> frame_of_packet_;  // decode order -> frame index (-1: no frame)
  std::vector<int64_t> frame_keys_;       // frame index -> pts
  std::vector<int64_t> keyframes_;
  std::vector<SeekPoint> seek_points_;
  int64_t num_frames_ = 0;
  bool index_used_ = false;  // packets listed from the MP4/MOV sample index
  int64_t decoders_used_ = 0;
  bool keys_known_ = false;
  bool all_pts_ = false;
  bool skip_nonref_ = false;
  std::string scan_error_;
};

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.class_<VideoReader>("VideoReader")
      .def(torch::init<std::string, int64_t, int64_t, bool>())
      .def("num_frames", &VideoReader::num_frames)
      .def("width", &VideoReader::width)
      .def("height", &VideoReader::height)
      .def("fps", &VideoReader::fps)
      .def("duration", &VideoReader::duration)
      .def("codec", &VideoReader::codec)
      .def("pixel_format", &VideoReader::pixel_format)
      .def("decode_device", &VideoReader::decode_device)
      .def("keyframes", &VideoReader::keyframes)
      .def("timestamps", &VideoReader::timestamps)
      .def("scan_error", &VideoReader::scan_error)
      .def("index_used", &VideoReader::index_used)
      .def("decoders_used", &VideoReader::decoders_used)
      .def("seek_frames", &VideoReader::seek_frames)
      .def("get_frames", &VideoReader::get_frames)
      .def("close", &VideoReader::close);
}

}  // namespace vidfast::video_reader
