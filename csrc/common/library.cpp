// The vidfast op namespace. Each op folder adds its schemas with TORCH_LIBRARY_FRAGMENT(vidfast, m).
#include <torch/library.h>

#include <string>

namespace vidfast {
namespace {

std::string build_info() {
  std::string json = "{\"cuda_kernels\": ";
#if defined(VIDFAST_WITH_CUDA)
  json += "true";
#else
  json += "false";
#endif
  json += ", \"cuda_archs\": \"" VIDFAST_BUILD_CUDA_ARCHS "\", \"torch\": \"" VIDFAST_BUILD_TORCH_VERSION "\", \"nvtx\": ";
#if defined(VIDFAST_WITH_NVTX)
  json += "true";
#else
  json += "false";
#endif
  json += ", \"video_reader\": ";
#if defined(VIDFAST_WITH_FFMPEG)
  json += "true";
#else
  json += "false";
#endif
  json += "}";
  return json;
}

}  // namespace

TORCH_LIBRARY(vidfast, m) { m.def("_build_info() -> str", &build_info); }

}  // namespace vidfast
