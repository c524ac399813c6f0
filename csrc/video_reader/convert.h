#pragma once
// Host-side interface of the fused frame conversion (decoded picture -> model-ready tensor slot).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "video_reader/convert_math.h"

extern "C" {
struct AVFrame;
struct AVBufferRef;
}

namespace vidfast::video_reader {

// One 8-bit input plane. `step` is the distance in bytes between neighbouring samples (2 for NV12's interleaved
// chroma); `extent_x/y` is the picture's size in this plane's samples (width / horizontal subsampling, which is
// fractional for odd widths), so all planes map onto the same picture area.
struct Plane {
  const uint8_t* data;
  int64_t linesize;
  int step;
  int width, height;
  float extent_x, extent_y;
};

struct PictureView {
  Plane planes[3];
  ColorTransform color;
};

// Where and how one frame is written: element strides of the output tensor within the frame's slot.
struct OutputSpec {
  int height, width;
  at::ScalarType dtype;
  int64_t stride_c, stride_y, stride_x;
  Normalize norm;
};

// Converts output rows [row_begin, row_end) of one frame on the calling thread. `out` points at the frame's first
// element (channel 0, row 0, column 0).
void convert_rows_cpu(const PictureView& picture, const OutputSpec& spec, void* out, int row_begin, int row_end);

#if defined(VIDFAST_WITH_CUDA)
// An FFmpeg CUDA device on torch's (primary) context of GPU `device_index`; nullptr and `error` set on failure.
AVBufferRef* create_cuda_device(int device_index, std::string* error);

// Converts a decoded NV12 CUDA frame into `out[slot]` (a CUDA tensor, frame dimension `frame_dim`) on torch's
// current stream, ordered after FFmpeg's copy of the picture and before FFmpeg may reuse the surface.
void convert_nv12_cuda(const AVFrame* frame, const ColorTransform& color, const OutputSpec& spec, at::Tensor& out,
                       int64_t frame_offset);
#endif

}  // namespace vidfast::video_reader
