// MP4/MOV sample tables: the per-sample sizes ('stsz') and composition offsets ('ctts') of one track, read from
// the file's 'moov' box, which FFmpeg's sample index does not keep.
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

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

}  // namespace

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
    // ctts runs (samples, offset), expanded only once stsz has said how many samples there are: a run count that
    // lies would otherwise allocate up to 16 GB (found by make fuzz).
    std::vector<std::pair<uint32_t, int64_t>> ctts_runs;
    uint64_t ctts_samples = 0;
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
        if (constant != 0 && count > file_size / constant) return false;  // more bytes than the file holds
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
          ctts_samples += count;
          ctts_runs.emplace_back(count, offset);
        }
      }
      return true;
    };
    if (!for_each_box(p, size, walk)) return false;
    if (id != track_id) return true;
    ++tracks_found;
    if (stz2 || stsz_count != 1 || ctts_count > 1 || ctts_samples > t.sizes.size()) return false;
    for (const auto& [count, offset] : ctts_runs) t.offsets.insert(t.offsets.end(), count, offset);
    *out = std::move(t);
    return true;
  });
  return ok && tracks_found == 1;
}

}  // namespace vidfast::video_reader
