// NVDEC support: an FFmpeg CUDA device on torch's primary context, and the fused NV12 -> RGB resize-normalize
// kernel that writes a decoded surface straight into a CUDA tensor on torch's current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <cuda_bf16.h>

#include <string>

extern "C" {
#include <libavutil/hwcontext.h>
#include <libavutil/hwcontext_cuda.h>
}

#include "common/nvtx.h"
#include "video_reader/convert.h"

namespace vidfast::video_reader {
namespace {

struct Nv12Args {
  const uint8_t* luma;
  const uint8_t* chroma;  // interleaved U, V
  int64_t luma_pitch, chroma_pitch;
  int width, height;
  ColorTransform color;
  Normalize norm;
  int out_height, out_width;
  int64_t stride_c, stride_y, stride_x;
};

// Antialiased bilinear sample of one plane at output pixel (ox, oy); the same taps and weights as the CPU kernel.
__device__ float resample(const uint8_t* plane, int64_t pitch, int step, const ResizeAxis& ax,
                          const ResizeAxis& ay, int ox, int oy) {
  int x0, nx, y0, ny;
  axis_taps(ax, ox, &x0, &nx);
  axis_taps(ay, oy, &y0, &ny);
  float wx_sum = 0.0f;
  for (int tx = 0; tx < nx; ++tx) wx_sum += axis_weight(ax, ox, x0 + tx);
  float acc = 0.0f, wy_sum = 0.0f;
  for (int ty = 0; ty < ny; ++ty) {
    const float wy = axis_weight(ay, oy, y0 + ty);
    if (wy == 0.0f) continue;
    wy_sum += wy;
    const uint8_t* row = plane + (y0 + ty) * pitch + x0 * step;
    float row_acc = 0.0f;
    for (int tx = 0; tx < nx; ++tx) row_acc += axis_weight(ax, ox, x0 + tx) * static_cast<float>(row[tx * step]);
    acc += wy * row_acc;
  }
  return acc / (wx_sum * wy_sum);
}

template <typename T>
__global__ void nv12_kernel(Nv12Args a, T* out) {
  const int ox = blockIdx.x * blockDim.x + threadIdx.x;
  const int oy = blockIdx.y * blockDim.y + threadIdx.y;
  if (ox >= a.out_width || oy >= a.out_height) return;
  const float w = static_cast<float>(a.width), h = static_cast<float>(a.height);
  const ResizeAxis lx = make_axis(a.width, w, a.out_width), ly = make_axis(a.height, h, a.out_height);
  const ResizeAxis cx = make_axis((a.width + 1) / 2, 0.5f * w, a.out_width);
  const ResizeAxis cy = make_axis((a.height + 1) / 2, 0.5f * h, a.out_height);
  float sample[3];
  sample[0] = resample(a.luma, a.luma_pitch, 1, lx, ly, ox, oy);
  sample[1] = resample(a.chroma, a.chroma_pitch, 2, cx, cy, ox, oy);
  sample[2] = resample(a.chroma + 1, a.chroma_pitch, 2, cx, cy, ox, oy);
  float rgb[3];
  apply_color(a.color, sample, rgb);
  T* px = out + oy * a.stride_y + ox * a.stride_x;
#pragma unroll
  for (int c = 0; c < 3; ++c) px[c * a.stride_c] = store_value<T>(rgb[c] * a.norm.scale[c] + a.norm.bias[c]);
}

}  // namespace

AVBufferRef* create_cuda_device(int device_index, std::string* error) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  C10_CUDA_CHECK(cudaFree(nullptr));  // makes sure torch's primary context exists; FFmpeg then shares it
  AVBufferRef* device = nullptr;
  const std::string name = std::to_string(device_index);
  const int ret =
      av_hwdevice_ctx_create(&device, AV_HWDEVICE_TYPE_CUDA, name.c_str(), nullptr, AV_CUDA_USE_PRIMARY_CONTEXT);
  if (ret < 0) {
    char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
    av_strerror(ret, buf, sizeof(buf));
    *error = std::string("FFmpeg's CUDA device: ") + buf;
    return nullptr;
  }
  return device;
}

void convert_nv12_cuda(const AVFrame* frame, const ColorTransform& color, const OutputSpec& spec, at::Tensor& out,
                       int64_t frame_offset) {
  VIDFAST_NVTX_RANGE("decode/convert_nv12");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto* frames_ctx = reinterpret_cast<const AVHWFramesContext*>(frame->hw_frames_ctx->data);
  const auto* device_ctx = static_cast<const AVCUDADeviceContext*>(frames_ctx->device_ctx->hwctx);
  // FFmpeg copies each decoded picture into its surface on its own stream (the legacy default stream unless
  // set): order the kernel after that copy, and FFmpeg's next use of the surface after the kernel.
  const auto ffmpeg_stream = reinterpret_cast<cudaStream_t>(device_ctx->stream);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaEvent_t decoded, converted;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&decoded, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&converted, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(decoded, ffmpeg_stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream, decoded, 0));

  Nv12Args a{};
  a.luma = frame->data[0];
  a.chroma = frame->data[1];
  a.luma_pitch = frame->linesize[0];
  a.chroma_pitch = frame->linesize[1];
  a.width = frame->width;
  a.height = frame->height;
  a.color = color;
  a.norm = spec.norm;
  a.out_height = spec.height;
  a.out_width = spec.width;
  a.stride_c = spec.stride_c;
  a.stride_y = spec.stride_y;
  a.stride_x = spec.stride_x;
  const dim3 block(32, 8);
  const dim3 grid((spec.width + block.x - 1) / block.x, (spec.height + block.y - 1) / block.y);
  switch (spec.dtype) {
    case at::kByte:
      nv12_kernel<uint8_t><<<grid, block, 0, stream>>>(a, out.data_ptr<uint8_t>() + frame_offset);
      break;
    case at::kFloat:
      nv12_kernel<float><<<grid, block, 0, stream>>>(a, out.data_ptr<float>() + frame_offset);
      break;
    case at::kBFloat16:
      nv12_kernel<c10::BFloat16><<<grid, block, 0, stream>>>(a, out.data_ptr<c10::BFloat16>() + frame_offset);
      break;
    default:
      TORCH_CHECK_TYPE(false, "dtype: expected uint8, float32 or bfloat16; got ", spec.dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cudaEventRecord(converted, stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(ffmpeg_stream, converted, 0));
  C10_CUDA_CHECK(cudaEventDestroy(decoded));  // released once the recorded work completes
  C10_CUDA_CHECK(cudaEventDestroy(converted));
}

}  // namespace vidfast::video_reader
