// The VideoReader class as torch.classes.vidfast.VideoReader (pyvidfast/io/reader.py wraps it).
#include <torch/custom_class.h>
#include <torch/library.h>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.class_<VideoReader>("VideoReader")
      // (path, bytes, read_at, size, cuda_device, threads, read_all_packets, allowed_formats): one of a local
      // file's path, bytes in memory (a uint8 tensor over the caller's buffer) or a read callback's address and
      // stream size; cuda_device -1 for the CPU; threads 0 for automatic; read_all_packets for tests only.
      .def(torch::init([](std::string path, at::Tensor bytes, int64_t read_at, int64_t size, int64_t cuda_device,
                          int64_t threads, bool read_all_packets, std::vector<std::string> allowed_formats) {
        Source source;
        source.path = std::move(path);
        source.allowed_formats = std::move(allowed_formats);
        const int kinds = !source.path.empty() + (bytes.numel() > 0) + (read_at != 0);
        TORCH_CHECK_VALUE(kinds == 1, "source: expected one of a path, bytes or a read callback");
        if (bytes.numel() > 0) {
          TORCH_CHECK_TYPE(bytes.scalar_type() == at::kByte && bytes.dim() == 1 && bytes.is_contiguous() &&
                               bytes.device().is_cpu(),
                           "source: bytes must come as a contiguous 1-D uint8 CPU tensor");
          source.bytes = std::move(bytes);
        } else if (read_at != 0) {
          TORCH_CHECK_VALUE(size > 0, "source: the stream is empty");
          source.read_at = reinterpret_cast<ReadAtFn>(read_at);
          source.size = size;
          source.read_lock = std::make_shared<std::mutex>();
        }
        return c10::make_intrusive<VideoReader>(std::move(source), cuda_device, threads, read_all_packets);
      }))
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
      .def("get_frames", &VideoReader::get_frames)
      .def("close", &VideoReader::close)
      // Private: how the reader worked, for tests (not part of pyvidfast's API).
      .def("_index_used", &VideoReader::index_used)
      .def("_decoders_used", &VideoReader::decoders_used)
      .def("_seek_frames", &VideoReader::seek_frames);
}

}  // namespace vidfast::video_reader
