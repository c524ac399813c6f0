// Conversion dispatch: where each decoded frame goes. NV12 frames on the GPU (NVDEC) go to the CUDA kernel at
// once; host frames wait for a batch, then native-size uint8 THWC frames go through libswscale (bit-exact with
// what PyAV returns) and every other output through the fused CPU kernel (convert.h), after a libswscale step to
// planar RGB for pixel formats the kernels do not read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

extern "C" {
#include <libavutil/hwcontext.h>
#include <libavutil/pixdesc.h>
}

#include "common/nvtx.h"
#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

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

// libswscale's YUV -> RGB matrix and input range for frame f (its colour space tag; BT.601 where there is none).
void set_color_details(SwsContext* sws, const AVFrame* f) {
  const int full = f->color_range == AVCOL_RANGE_JPEG ? 1 : 0;
  const int cs = f->colorspace == AVCOL_SPC_UNSPECIFIED ? SWS_CS_DEFAULT : static_cast<int>(f->colorspace);
  const int* coefficients = sws_getCoefficients(cs);
  sws_setColorspaceDetails(sws, coefficients, full, coefficients, 1, 0, 1 << 16, 1 << 16);
}

// Pixel formats the kernels do not read directly (10-bit, RGB, palettes, grey) go through libswscale to
// planar 8-bit RGB at the native size first, with its exact arithmetic (accurate rounding, chroma interpolated
// for every pixel) and the frame's colour matrix and range.
FramePtr to_gbrp(SwsContextPtr& sws, const AVFrame* src) {
  FramePtr dst = make_frame();
  dst->format = AV_PIX_FMT_GBRP;
  dst->width = src->width;
  dst->height = src->height;
  TORCH_CHECK(av_frame_get_buffer(dst.get(), 0) >= 0, "VideoReader: out of memory");
  sws.reset(sws_getCachedContext(sws.release(), src->width, src->height, static_cast<AVPixelFormat>(src->format),
                                 src->width, src->height, AV_PIX_FMT_GBRP,
                                 SWS_BILINEAR | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, nullptr, nullptr, nullptr));
  TORCH_CHECK_NOT_IMPLEMENTED(sws, "VideoReader: cannot convert pixel format ",
                              av_get_pix_fmt_name(static_cast<AVPixelFormat>(src->format)));
  set_color_details(sws.get(), src);
  sws_scale(sws.get(), src->data, src->linesize, 0, src->height, dst->data, dst->linesize);
  return dst;
}

// Native size, uint8, THWC: libswscale's own conversion, bit-exact with what PyAV and most tools return.
bool swscale_path(const AVFrame* f, const OutputSpec& spec, int64_t frame_dim) {
  return spec.dtype == at::kByte && frame_dim == 0 && f->width == spec.width && f->height == spec.height &&
         f->format != AV_PIX_FMT_GBRP;
}

void swscale_into(ThreadSws& t, const AVFrame* f, uint8_t* out, int64_t row_stride) {
  // The flags FFmpeg's command line converts with (bicubic). They matter only where libswscale has no unscaled
  // converter for the format, which for 4:2:0 includes every odd height: there its chroma is interpolated with
  // this filter (bilinear gave up to 3 levels' mean difference from `ffmpeg -pix_fmt rgb24` on MPEG-2).
  const SwsContext* before = t.ctx.get();
  t.ctx.reset(sws_getCachedContext(t.ctx.release(), f->width, f->height, static_cast<AVPixelFormat>(f->format),
                                   f->width, f->height, AV_PIX_FMT_RGB24, SWS_BICUBIC, nullptr, nullptr, nullptr));
  TORCH_CHECK(t.ctx, "VideoReader: libswscale cannot convert pixel format ",
              av_get_pix_fmt_name(static_cast<AVPixelFormat>(f->format)));
  if (t.ctx.get() != before || f->colorspace != t.colorspace || f->color_range != t.full_range) {
    set_color_details(t.ctx.get(), f);
    t.colorspace = f->colorspace, t.full_range = f->color_range;
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

}  // namespace

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

void enqueue_conversion(Decoder& d, Request& req, Work& w, size_t j) {
#if defined(VIDFAST_WITH_CUDA)
  if (d.frame->format == AV_PIX_FMT_CUDA) {
    const int64_t offset = req.slots[j][0] * req.out.stride(req.frame_dim);
    const auto* frames_ctx = reinterpret_cast<const AVHWFramesContext*>(d.frame->hw_frames_ctx->data);
    if (frames_ctx->sw_format == AV_PIX_FMT_NV12) {
      convert_nv12_cuda(d.frame.get(), color_transform_of(d.frame.get()), req.spec, req.out, offset);
      av_frame_unref(d.frame.get());
      return;
    }
  }
#endif
  FramePtr f = make_frame();
  if (d.frame->hw_frames_ctx) {  // a GPU format the CUDA kernel does not read (10-bit): bring it to the host
    const int ret = av_hwframe_transfer_data(f.get(), d.frame.get(), 0);
    TORCH_CHECK(ret >= 0, "VideoReader: cannot copy a decoded frame to the host: ", av_error_text(ret));
    av_frame_copy_props(f.get(), d.frame.get());
    av_frame_unref(d.frame.get());
  } else {
    av_frame_move_ref(f.get(), d.frame.get());
  }
  int sx, sy;
  bool nv12;
  if (!direct_format(static_cast<AVPixelFormat>(f->format), &sx, &sy, &nv12) &&
      !swscale_path(f.get(), req.spec, req.frame_dim)) {
    f = to_gbrp(d.sws, f.get());
  }
  w.pending.push_back({std::move(f), j});
  if (static_cast<int64_t>(w.pending.size()) >= w.batch) flush_conversions(req, w);
}

void flush_conversions(Request& req, Work& w) {
  if (w.pending.empty()) return;
  VIDFAST_NVTX_RANGE("decode/convert");
  at::Tensor target = req.out;
  if (target.is_cuda()) {  // frames decoded in software for a CUDA result: convert on the host, copy later
    if (!req.cpu_staging.defined()) req.cpu_staging = at::empty_like(req.out, req.out.options().device(at::kCPU));
    target = req.cpu_staging;  // CUDA results come from one decoder, so this is not raced
  }
  const int64_t frames = static_cast<int64_t>(w.pending.size());
  std::vector<ThreadSws>& thread_sws = *req.thread_sws;
  const int64_t threads = w.serial ? 1 : static_cast<int64_t>(thread_sws.size());
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
      for (int64_t item = begin; item < end; ++item) convert(item, thread_sws[at::get_thread_num()]);
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

}  // namespace vidfast::video_reader
