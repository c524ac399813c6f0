// The VideoReader class: opening (packet index, decoder, NVDEC), metadata, and get_frames, which plans a
// request and runs it on one decoder or several in parallel, redoing it where a decoder found the index wrong.
#include "video_reader/video_reader.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

extern "C" {
#include <libavutil/pixdesc.h>
}

#include "common/nvtx.h"

namespace vidfast::video_reader {
namespace {

constexpr int64_t kMaxOutputSide = 16384;  // pixels; outputs beyond are almost surely a mistake

}  // namespace

VideoReader::VideoReader(Source source, int64_t cuda_device, int64_t threads, bool read_all_packets)
    : source_(std::move(source)), path_(source_.name()), cuda_device_(cuda_device), threads_(threads) {
  TORCH_CHECK_VALUE(threads >= 0, "threads: expected 0 (automatic) or a positive count; got ", threads);
  main_ = std::make_unique<Decoder>(source_, /*stream_index=*/-1);
  index_ = index_packets(*main_, read_all_packets);
  if (cuda_device_ >= 0) hw_device_ = open_nvdec();
  main_->open_codec(static_cast<int>(threads_), hw_device_.get());
}

void VideoReader::close() {
  workers_.clear();
  main_.reset();
  hw_device_.reset();
  thread_sws_.clear();
}

const AVStream* VideoReader::stream() const {
  TORCH_CHECK(main_, "VideoReader: the reader is closed");
  return main_->stream();
}

int64_t VideoReader::width() const { return stream()->codecpar->width; }
int64_t VideoReader::height() const { return stream()->codecpar->height; }
std::string VideoReader::codec() const { return avcodec_get_name(stream()->codecpar->codec_id); }

std::string VideoReader::pixel_format() const {
  const char* name = av_get_pix_fmt_name(static_cast<AVPixelFormat>(stream()->codecpar->format));
  return name ? name : "unknown";
}

std::vector<int64_t> VideoReader::seek_frames() const {
  std::vector<int64_t> out;
  for (const auto& sp : index_.seek_points) out.push_back(sp.frame);
  return out;
}

// FFmpeg's CUDA device for NVDEC, or nullptr (with a warning) where NVDEC cannot take the stream: then frames are
// decoded on the CPU and copied to the GPU.
BufferRefPtr VideoReader::open_nvdec() const {
#if defined(VIDFAST_WITH_CUDA)
  const auto fmt = static_cast<AVPixelFormat>(stream()->codecpar->format);
  const bool h264_not_420 = stream()->codecpar->codec_id == AV_CODEC_ID_H264 && fmt != AV_PIX_FMT_YUV420P &&
                            fmt != AV_PIX_FMT_YUVJ420P && fmt != AV_PIX_FMT_NONE;
  if (h264_not_420) {
    TORCH_WARN("VideoReader: NVDEC cannot decode H.264 ", pixel_format(), " (", path_,
               "); decoding on the CPU and copying the frames to the GPU");
    return nullptr;
  }
  std::string error;
  BufferRefPtr device(create_cuda_device(static_cast<int>(cuda_device_), &error));
  if (!device) {
    TORCH_WARN("VideoReader: cannot use NVDEC (", error, "); decoding on the CPU and copying the frames to the GPU");
  }
  return device;
#else
  TORCH_CHECK(false, "device: this build of pyvidfast has no CUDA kernels; use device=\"cpu\"");
#endif
}

double VideoReader::fps() const {
  const AVStream* s = stream();
  for (AVRational r : {s->avg_frame_rate, s->r_frame_rate}) {
    if (r.num > 0 && r.den > 0) return av_q2d(r);
  }
  const double d = duration();
  return d > 0 ? static_cast<double>(index_.num_frames) / d : 0.0;
}

double VideoReader::duration() const {
  if (index_.frame_keys.empty() || !index_.keys_known) return 0.0;
  const double tb = av_q2d(stream()->time_base);
  int64_t last_duration = 0;
  for (const auto& p : index_.packets) {
    if (p.has_frame && index_.key_of(p) == index_.frame_keys.back()) last_duration = p.duration;
  }
  return static_cast<double>(index_.frame_keys.back() - index_.frame_keys.front() + last_duration) * tb;
}

at::Tensor VideoReader::timestamps() const {
  auto out = at::empty({index_.num_frames}, at::kDouble);
  const double tb = av_q2d(stream()->time_base);
  const double f = fps();
  for (int64_t i = 0; i < index_.num_frames; ++i) {
    out[i] = index_.keys_known ? static_cast<double>(index_.frame_keys[i] - index_.frame_keys[0]) * tb : (f > 0 ? i / f : 0.0);
  }
  return out;
}

at::Tensor VideoReader::get_frames(const at::Tensor& indices, int64_t height, int64_t width, const std::string& layout,
                                   at::ScalarType dtype, std::vector<double> mean, std::vector<double> stdev,
                                   bool partial) {
  VIDFAST_NVTX_RANGE("decode/get_frames");
  TORCH_CHECK(main_, "VideoReader: the reader is closed");
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
  TORCH_CHECK_VALUE(height > 0 && width > 0 && height <= kMaxOutputSide && width <= kMaxOutputSide,
                    "size: expected (height, width) with both in [1, ", kMaxOutputSide, "]; got (", height, ", ", width, ")");
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
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < index_.num_frames, "indices: frame ", ip[i], " is out of range for a video of ",
                      index_.num_frames, " frames");
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

  plan_targets(ip, n, index_.num_frames, &req);

  const std::vector<int64_t> missing = decode_request(req);
  if (!missing.empty()) {
    TORCH_CHECK(partial, "VideoReader: frame ", missing.front(), " of ", path_,
                " could not be decoded: the stream ended or broke before it (", missing.size(),
                " requested frame(s) missing", index_.scan_error.empty() ? "" : ", demuxer error: " + index_.scan_error,
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
    TORCH_WARN("VideoReader: ", missing.size(), " requested frame(s) of ", path_,
               " could not be decoded and are left out of the result");
    return req.out.index_select(req.frame_dim, at::tensor(keep, at::kLong).to(device));
  }
  return req.out;
}

std::vector<int64_t> VideoReader::decode_request(Request& req) {
  const int64_t torch_threads = at::get_num_threads();
  if (static_cast<int64_t>(thread_sws_.size()) < torch_threads) thread_sws_.resize(torch_threads);
  req.thread_sws = &thread_sws_;
  while (true) {
    const int64_t threads = threads_ > 0 ? std::min(threads_, torch_threads) : torch_threads;
    const bool frame_threads = (main_->codec->codec->capabilities & AV_CODEC_CAP_FRAME_THREADS) != 0;
    const std::vector<std::vector<size_t>> groups =
        plan_decoders(req, index_, threads, frame_threads, /*allow_split=*/cuda_device_ < 0);
    const int64_t parallel = static_cast<int64_t>(groups.size());
    decoders_used_ = parallel;
    std::vector<Work> works(parallel);
    for (int64_t k = 0; k < parallel; ++k) works[k].targets = groups[k];
    if (parallel == 1) {
      // With FFmpeg's frame threads busy on every core, converting on this thread (while they decode the
      // packets already sent) beats splitting each conversion over torch's threads: about 10 % less time per
      // request on 2 cores shared with other jobs (not measured on a quiet machine), and no loss where
      // conversion dominates (every frame at native size).
      works[0].serial = (main_->codec->active_thread_type & FF_THREAD_FRAME) != 0;
      works[0].batch = works[0].serial ? 1 : torch_threads;
      main_->decode(index_, req, works[0]);
    } else {
      if (static_cast<int64_t>(workers_.size()) < parallel) workers_.resize(parallel);
      for (auto& w : works) w.serial = true;
      at::parallel_for(0, parallel, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          try {  // each thread opens its own decoder (in parallel with the others)
            if (!workers_[k]) {
              auto d = std::make_unique<Decoder>(source_, main_->stream_index);
              d->open_codec(1, nullptr);
              workers_[k] = std::move(d);
            }
          } catch (...) {
            works[k].error = std::current_exception();
            continue;
          }
          workers_[k]->decode(index_, req, works[k]);
        }
      });
    }
    bool retry = false;
    const size_t seek_points_before = index_.seek_points.size();
    const bool skip_nonref_before = index_.skip_nonref;
    for (auto& w : works) {
      if (w.error) std::rethrow_exception(w.error);
      if (w.failure == WorkFailure::kPtsOrderMismatch) {
        index_.skip_nonref = false;  // identify frames by counting from now on
      } else if (w.failure == WorkFailure::kBadSeekPoint) {
        auto& points = index_.seek_points;
        points.erase(std::remove_if(points.begin(), points.end(),
                                    [&](const SeekPoint& sp) { return sp.packet == w.bad_seek.packet; }),
                     points.end());
      }
      retry = retry || w.failure != WorkFailure::kNone;
    }
    if (retry) {
      // Each redo drops a seek point or stops skipping non-reference frames: one that changes neither would loop.
      TORCH_CHECK(index_.seek_points.size() < seek_points_before || index_.skip_nonref != skip_nonref_before,
                  "VideoReader: decoding ", path_, " stopped making progress");
      main_->positioned = false;
      for (auto& d : workers_) d->positioned = false;
      continue;
    }
    std::vector<int64_t> missing;
    for (auto& w : works) missing.insert(missing.end(), w.missing.begin(), w.missing.end());
    std::sort(missing.begin(), missing.end());
    return missing;
  }
}

}  // namespace vidfast::video_reader
