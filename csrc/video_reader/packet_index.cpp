// The packet index: every packet of the video stream listed without decoding (from the MP4/MOV sample index, or
// by reading them), sorted into frames in presentation order, with keyframes and seek points.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/nvtx.h"
#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

// Whether a keyframe holding these bytes is a safe start: for H.264 / HEVC only IDR pictures.
bool safe_start_bytes(const AVCodecParameters* par, const uint8_t* data, int size) {
  if (par->codec_id != AV_CODEC_ID_H264 && par->codec_id != AV_CODEC_ID_HEVC) return true;
  return has_idr_nal(data, size, nal_length_size(par), par->codec_id == AV_CODEC_ID_HEVC);
}

// What the packet scan records of a packet (the IDR test reads its bytes).
PacketInfo packet_info(const AVPacket* pkt, const AVCodecParameters* par) {
  const bool has_frame = pkt->size > 0 && !(pkt->flags & AV_PKT_FLAG_DISCARD);
  const bool key = (pkt->flags & AV_PKT_FLAG_KEY) != 0;
  return {pkt->pts, pkt->dts, pkt->pos, pkt->duration, key, key && safe_start_bytes(par, pkt->data, pkt->size),
          has_frame};
}

// Lists the video packets by reading every packet of the file (no decoding).
void scan_all_packets(Decoder& d, PacketIndex& index) {
  const AVCodecParameters* par = d.stream()->codecpar;
  VIDFAST_NVTX_RANGE("decode/scan");
  int ret;
  while ((ret = av_read_frame(d.fmt.get(), d.packet.get())) >= 0) {
    if (d.packet->stream_index == d.stream_index) {
      TORCH_CHECK_VALUE(static_cast<int64_t>(index.packets.size()) < kMaxPackets && d.packet->size <= kMaxPacketBytes,
                        d.source.argument(), ": ", d.path, " has more than ", kMaxPackets,
                        " video packets or one over ", kMaxPacketBytes, " bytes: over the reader's limits");
      index.packets.push_back(packet_info(d.packet.get(), par));
    }
    av_packet_unref(d.packet.get());
  }
  if (ret != AVERROR_EOF) index.scan_error = av_error_text(ret);
}

// Lists the video packets of an MP4/MOV file from the demuxer's sample index: each index entry is the packet
// av_read_frame returns (dts = entry timestamp, pos, size, keyframe and discard flags), and pts = dts + a
// constant shift + the sample's composition offset from the track's 'ctts' table, which the index does not
// keep. Only the keyframes' bytes are read (IDR test). Everything is checked: the index must map one to one
// onto the track's samples (same count and sizes, no fragments, every sample inside the file), and the packets
// av_read_frame returns at the start and over the last GOP must match the entries exactly. Returns false
// (the demuxer anywhere) where any check fails: then every packet is read.
bool packets_from_sample_index(Decoder& d, std::vector<PacketInfo>& packets) {
  AVStream* st = d.stream();
  const int64_t n = avformat_index_get_entries_count(st);
  if (n <= 0) return false;
  // A table claiming more packets than the cap is refused now: the scan would read them all before saying so.
  TORCH_CHECK_VALUE(n <= kMaxPackets, d.source.argument(), ": ", d.path, " lists ", n,
                    " video packets in its sample index, more than the reader's limit of ", kMaxPackets);
  Mp4Track track;
  if (!read_mp4_track(d.fmt->pb, st->id, &track)) return false;
  if (static_cast<int64_t>(track.sizes.size()) != n) return false;
  if (!track.offsets.empty() && static_cast<int64_t>(track.offsets.size()) != n) return false;
  const int64_t file_size = avio_size(d.fmt->pb);
  if (file_size <= 0) return false;
  packets.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    const AVIndexEntry* e = avformat_index_get_entry(st, static_cast<int>(k));
    if (!e || e->size != static_cast<int>(track.sizes[k]) || e->pos < 0 || e->pos + e->size > file_size) {
      return false;
    }
    const bool key = (e->flags & AVINDEX_KEYFRAME) != 0;
    const bool has_frame = e->size > 0 && !(e->flags & AVINDEX_DISCARD_FRAME);
    // pts without the constant shift for now (found below from a real packet); duration unknown (0).
    const int64_t offset = track.offsets.empty() ? 0 : track.offsets[k];
    packets[k] = {e->timestamp + offset, e->timestamp, e->pos, 0, key, false, has_frame};
  }
  // The first packets and the last GOP through the demuxer: they must be the index's entries, with one pts
  // shift for all, and the demuxer must end where the index does.
  int64_t shift = 0;
  bool shift_known = false;
  std::vector<uint8_t> checked(n, 0);
  auto check = [&](int64_t k) {
    PacketInfo got = packet_info(d.packet.get(), st->codecpar);
    PacketInfo& want = packets[k];
    if (!shift_known) {
      if (got.pts == kNoTs) return false;
      shift = got.pts - want.pts, shift_known = true;
    }
    want.pts += shift;
    if (got.pts != want.pts || got.dts != want.dts || got.pos != want.pos || got.key != want.key ||
        got.has_frame != want.has_frame || d.packet->size != avformat_index_get_entry(st, k)->size) {
      return false;
    }
    want.duration = got.duration;
    want.safe_start = got.safe_start;
    checked[k] = 1;
    return true;
  };
  // Keyframes' bytes are read straight from the file below: the demuxer must not change them (no decryption).
  auto file_bytes = [&](int64_t k, std::vector<uint8_t>* bytes) {
    const AVIndexEntry* e = avformat_index_get_entry(st, static_cast<int>(k));
    bytes->resize(e->size);
    return avio_seek(d.fmt->pb, e->pos, SEEK_SET) == e->pos &&
           avio_read(d.fmt->pb, bytes->data(), e->size) == e->size;
  };
  std::vector<uint8_t> bytes;
  if (!file_bytes(0, &bytes)) return false;
  const int64_t head = std::min<int64_t>(n, 64);
  for (int64_t k = 0; k < head; ++k) {
    if (!d.read_packet()) return false;
    // An empty packet has no data pointer, and memcmp must not be given one even for 0 bytes.
    const bool ok = check(k) && (k > 0 || (d.packet->size == static_cast<int>(bytes.size()) &&
                                           (bytes.empty() ||
                                            std::memcmp(d.packet->data, bytes.data(), bytes.size()) == 0)));
    av_packet_unref(d.packet.get());
    if (!ok) return false;
  }
  int64_t from = head;  // the entry the demuxer returns next
  int64_t tail = n - 1;
  while (tail > head && !packets[tail].key) --tail;
  if (tail > head) {  // jump to the last keyframe (the seek lands on the keyframe at or before its dts)
    if (av_seek_frame(d.fmt.get(), d.stream_index, packets[tail].dts, AVSEEK_FLAG_BACKWARD) < 0) return false;
    bool found = false;
    while (!found && d.read_packet()) {
      found = d.packet->pos == packets[tail].pos && d.packet->dts == packets[tail].dts;
      const bool ok = !found || check(tail);
      av_packet_unref(d.packet.get());
      if (!ok) return false;
    }
    if (!found) return false;
    from = tail + 1;
  }
  for (int64_t k = from; k < n; ++k) {
    if (!d.read_packet()) return false;
    const bool ok = check(k);
    av_packet_unref(d.packet.get());
    if (!ok) return false;
  }
  if (d.read_packet()) {  // more packets than entries
    av_packet_unref(d.packet.get());
    return false;
  }
  // Entries between the two read ranges: the same pts shift; keyframes' bytes read for the IDR test.
  for (int64_t k = 0; k < n; ++k) {
    PacketInfo& p = packets[k];
    if (checked[k]) continue;
    p.pts += shift;
    if (!p.key) continue;
    if (!file_bytes(k, &bytes)) return false;
    p.safe_start = safe_start_bytes(st->codecpar, bytes.data(), static_cast<int>(bytes.size()));
  }
  // The last frame in presentation order needs its packet's duration (read above unless the GOPs are open).
  int64_t last = -1;
  for (int64_t k = 0; k < n; ++k) {
    if (packets[k].has_frame && (last < 0 || packets[k].pts >= packets[last].pts)) last = k;
  }
  return last >= 0 && checked[last];
}

// Sorts the listed packets into frames, and finds keyframes and seek points.
void sort_into_frames(PacketIndex& x, const AVCodecParameters* par, const std::string& path) {
  // Presentation order: frames sorted by pts. Without a pts on every packet (AVI), frames are taken in decode
  // order, which is presentation order only for streams without reordering (B-frames).
  x.all_pts = true;
  for (const auto& p : x.packets) x.all_pts = x.all_pts && (!p.has_frame || p.pts != kNoTs);
  x.keys_known = true;
  std::vector<int64_t> frame_packets;
  for (size_t d = 0; d < x.packets.size(); ++d) {
    if (!x.packets[d].has_frame) continue;
    frame_packets.push_back(static_cast<int64_t>(d));
    x.keys_known = x.keys_known && x.key_of(x.packets[d]) != kNoTs;
  }
  const bool order_known = x.all_pts || par->video_delay == 0;
  x.num_frames = static_cast<int64_t>(frame_packets.size());
  TORCH_CHECK_VALUE(x.num_frames > 0, path, " has a video stream with no frames",
                    x.scan_error.empty() ? "" : " (" + x.scan_error + ")");
  if (x.keys_known) {
    std::stable_sort(frame_packets.begin(), frame_packets.end(),
                     [&](int64_t a, int64_t b) { return x.key_of(x.packets[a]) < x.key_of(x.packets[b]); });
  }
  x.frame_of_packet.assign(x.packets.size(), -1);
  x.frame_keys.resize(x.num_frames);
  for (int64_t i = 0; i < x.num_frames; ++i) {
    const PacketInfo& p = x.packets[frame_packets[i]];
    x.frame_of_packet[frame_packets[i]] = i;
    x.frame_keys[i] = x.key_of(p);
    if (p.key) x.keyframes.push_back(i);
  }
  const bool unique_pts = std::adjacent_find(x.frame_keys.begin(), x.frame_keys.end()) == x.frame_keys.end();

  // Seek points: the start, and keyframes before which only earlier frames and after which only later frames
  // are decoded (closed GOPs), so decoding from there yields exactly the frames of a full decode.
  x.seek_points.push_back({0, 0});
  if (x.keys_known && order_known) {
    const int64_t n = static_cast<int64_t>(x.packets.size());
    std::vector<int64_t> suffix_min(n + 1, std::numeric_limits<int64_t>::max());
    for (int64_t d = n - 1; d >= 0; --d) {
      suffix_min[d] = x.packets[d].has_frame ? std::min(suffix_min[d + 1], x.key_of(x.packets[d])) : suffix_min[d + 1];
    }
    int64_t prefix_max = std::numeric_limits<int64_t>::min(), frames_before = 0;
    for (int64_t d = 0; d < n; ++d) {
      const PacketInfo& p = x.packets[d];
      if (d > 0 && p.safe_start && p.has_frame && prefix_max < x.key_of(p) && suffix_min[d] >= x.key_of(p) &&
          (p.dts != kNoTs || p.pts != kNoTs)) {
        x.seek_points.push_back({d, frames_before});
      }
      if (p.has_frame) {
        prefix_max = std::max(prefix_max, x.key_of(p));
        ++frames_before;
      }
    }
  }
  // Skipping non-reference frames identifies decoded frames by pts; the codecs below mark non-reference
  // pictures in the bitstream, so skipping them changes no other picture.
  const AVCodecID id = par->codec_id;
  const bool codec_ok = id == AV_CODEC_ID_H264 || id == AV_CODEC_ID_HEVC || id == AV_CODEC_ID_MPEG4 ||
                        id == AV_CODEC_ID_MPEG2VIDEO || id == AV_CODEC_ID_MPEG1VIDEO;
  x.skip_nonref = x.keys_known && x.all_pts && unique_pts && codec_ok;
}

}  // namespace

SeekPoint PacketIndex::seek_point_before(int64_t frame) const {
  auto it = std::upper_bound(seek_points.begin(), seek_points.end(), frame,
                             [](int64_t f, const SeekPoint& sp) { return f < sp.frame; });
  return *(it - 1);
}

PacketIndex index_packets(Decoder& d, bool read_all_packets) {
  PacketIndex index;
  if (!read_all_packets && std::strncmp(d.fmt->iformat->name, "mov,", 4) == 0) {
    VIDFAST_NVTX_RANGE("decode/index");
    index.from_sample_index = packets_from_sample_index(d, index.packets);
    if (!index.from_sample_index) {
      index.packets.clear();
      d.reopen();  // the demuxer back at the start
    }
  }
  if (!index.from_sample_index) scan_all_packets(d, index);
  sort_into_frames(index, d.stream()->codecpar, d.source.argument() + ": " + d.path);
  return index;
}

}  // namespace vidfast::video_reader
