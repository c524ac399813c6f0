// Bitstream tests on H.264 / HEVC packets: IDR pictures (safe decoding starts), the length-prefix size, and the
// NAL units that are not coded slices.
#include <c10/util/Exception.h>

#include <cstring>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

// NAL unit types (H.264 table 7-1, HEVC table 7-1).
constexpr int kH264SliceFirst = 1, kH264SliceIdr = 5;  // 1..5: coded slices; 5: of an IDR picture
constexpr int kHevcIdrWithLeading = 19, kHevcIdrNoLeading = 20;  // IDR_W_RADL, IDR_N_LP

int h264_nal_type(uint8_t header) { return header & 0x1f; }
int hevc_nal_type(uint8_t header) { return (header >> 1) & 0x3f; }

// The big-endian length prefix of `nal_length` bytes at data.
int64_t read_length(const uint8_t* data, int nal_length) {
  int64_t len = 0;
  for (int b = 0; b < nal_length; ++b) len = (len << 8) | data[b];
  return len;
}

}  // namespace

bool has_idr_nal(const uint8_t* data, int size, int nal_length, bool hevc) {
  auto is_idr = [&](uint8_t header) {
    if (hevc) {
      const int type = hevc_nal_type(header);
      return type == kHevcIdrWithLeading || type == kHevcIdrNoLeading;
    }
    return h264_nal_type(header) == kH264SliceIdr;
  };
  if (nal_length > 0) {
    for (int64_t at = 0; at + nal_length < size;) {
      const int64_t len = read_length(data + at, nal_length);
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

int nal_length_size(const AVCodecParameters* par) {
  // avcC / hvcC records: version 1, lengthSizeMinusOne in the low two bits of byte 4 / byte 21.
  const uint8_t* x = par->extradata;
  if (par->codec_id == AV_CODEC_ID_H264 && par->extradata_size >= 7 && x[0] == 1) return (x[4] & 3) + 1;
  if (par->codec_id == AV_CODEC_ID_HEVC && par->extradata_size >= 23 && x[0] == 1) return (x[21] & 3) + 1;
  return 0;
}

bool keep_h264_headers(AVPacket* pkt, int nal_length) {
  if (nal_length == 0) return true;
  TORCH_CHECK(av_packet_make_writable(pkt) >= 0, "VideoReader: out of memory");
  int kept = 0;
  for (int at = 0; at + nal_length < pkt->size;) {
    const int64_t len = read_length(pkt->data + at, nal_length);
    if (len <= 0 || at + nal_length + len > pkt->size) break;
    const int unit = nal_length + static_cast<int>(len);
    const int type = h264_nal_type(pkt->data[at + nal_length]);
    if (type < kH264SliceFirst || type > kH264SliceIdr) {
      std::memmove(pkt->data + kept, pkt->data + at, unit);
      kept += unit;
    }
    at += unit;
  }
  std::memset(pkt->data + kept, 0, pkt->size - kept);
  pkt->size = kept;
  return kept > 0;
}

}  // namespace vidfast::video_reader
