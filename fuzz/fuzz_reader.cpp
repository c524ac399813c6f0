// libFuzzer target of the frame reader's C++ core (csrc/video_reader, without the torch class registration): each
// input is a file that VideoReader opens, lists (FFmpeg's demuxer, the MP4 sample tables of mp4.cpp, the packet
// index, the bitstream tests) and decodes a few frames of (the planner, decoders, conversion). Errors the reader
// raises are the expected outcome of a bad file; a crash, a sanitizer report, a leak or a hang is a finding.
#include <ATen/ATen.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <exception>
#include <string>

#include "video_reader/video_reader.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  av_log_set_level(AV_LOG_QUIET);  // FFmpeg's complaints about broken inputs are not findings
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The reader opens paths: the input goes to an in-memory file.
  const int fd = memfd_create("fuzz_input", 0);
  if (fd < 0) return 0;
  for (size_t done = 0; done < size;) {
    const ssize_t n = write(fd, data + done, size - done);
    if (n <= 0) break;
    done += size_t(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  // The first byte also picks how packets are listed: from the MP4 sample index or by reading every packet.
  const bool read_all_packets = size > 0 && (data[0] & 1);
  try {
    auto reader = c10::make_intrusive<vidfast::video_reader::VideoReader>(path, -1, 1, read_all_packets);
    reader->timestamps();
    const int64_t n = reader->num_frames();
    if (n > 0) {
      const at::Tensor indices = at::empty({4}, at::kLong);
      int64_t* index = indices.data_ptr<int64_t>();
      index[0] = n - 1, index[1] = 0, index[2] = n / 2, index[3] = n - 1;
      reader->get_frames(indices, 8, 8, "THWC", at::kByte, {}, {}, /*partial=*/true);
      reader->get_frames(indices.narrow(0, 2, 2), 0, 0, "CTHW", at::kFloat, {0.5, 0.5, 0.5}, {0.2, 0.2, 0.2},
                         /*partial=*/false);
    }
  } catch (const std::exception&) {
    // A clear error is the right answer to a broken file.
  }
  close(fd);
  return 0;
}
