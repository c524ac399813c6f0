// The VideoReader class as torch.classes.vidfast.VideoReader (pyvidfast/io/reader.py wraps it).
#include <torch/custom_class.h>
#include <torch/library.h>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {

TORCH_LIBRARY_FRAGMENT(vidfast, m) {
  m.class_<VideoReader>("VideoReader")
      // (path, cuda_device: -1 for the CPU, threads: 0 for automatic, _read_all_packets: tests only)
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
      .def("get_frames", &VideoReader::get_frames)
      .def("close", &VideoReader::close)
      // Private: how the reader worked, for tests (not part of pyvidfast's API).
      .def("_index_used", &VideoReader::index_used)
      .def("_decoders_used", &VideoReader::decoders_used)
      .def("_seek_frames", &VideoReader::seek_frames);
}

}  // namespace vidfast::video_reader
