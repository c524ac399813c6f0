#pragma once
// An exact, planned frame reader over FFmpeg, exposed as the torch custom class vidfast.VideoReader.
//
// Frame i is the i-th frame a full sequential decode outputs. Opening lists every packet of the video stream
// (no decoding) to count frames and to find the keyframes where decoding may start without changing any later
// frame: for MP4/MOV from the demuxer's sample index (checked against the file's sample tables and against
// packets read at both ends), else by reading every packet. A request is planned: sorted and de-duplicated,
// decoded forward only, seeking to a keyframe only when it skips packets, converting only requested frames, and
// (where pts order has been verified) asking the decoder to skip non-reference frames that are not requested.
//
// One file per job, each section below naming its file:
//   ffmpeg.h / .cpp     owners (std::unique_ptr + FFmpeg's free functions) of every FFmpeg object
//   input.cpp           opening untrusted input: local files or byte input, refused demuxers
//   mp4.cpp             MP4/MOV sample-table parsing
//   bitstream.cpp       H.264 / HEVC bitstream tests (IDR pictures, NAL units)
//   packet_index.cpp    the packet index: packets, frames, keyframes, seek points
//   planner.cpp         the decode planner: targets, runs, the balanced split over decoders
//   decoder.cpp         one demuxer + decoder: seeking, decoding, identifying frames
//   conversion.cpp      conversion dispatch: NVDEC kernel, libswscale, or the fused CPU kernel (convert.h)
//   video_reader.cpp    the VideoReader class
//   binding.cpp         the class's registration with torch (public methods and a private section for tests)
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "video_reader/convert.h"
#include "video_reader/ffmpeg.h"

namespace vidfast::video_reader {

constexpr int64_t kNoTs = AV_NOPTS_VALUE;

// ---- Input (input.cpp) -------------------------------------------------------------------------------------

// Limits on what a file may declare, checked before anything that size is allocated: files in scraped datasets
// are not trusted.
constexpr int64_t kMaxPictureSide = 16384;        // pixels, each side
constexpr int64_t kMaxPicturePixels = int64_t{1} << 26;  // 8192 x 8192
constexpr int64_t kMaxPackets = int64_t{1} << 24;  // video packets (frames) in one file: 7.7 days at 25 fps
constexpr int64_t kMaxPacketBytes = int64_t{1} << 28;  // one compressed picture

// Reads up to `size` bytes at `offset` of the caller's byte stream into `buffer`: the count, 0 at the end, or
// -1 on an error. A Python file object's seek + readinto behind a ctypes callback (pyvidfast/io/reader.py), which
// takes the GIL itself.
using ReadAtFn = int64_t (*)(int64_t offset, void* buffer, int64_t size);

// Where a reader's bytes come from: a local file, bytes in memory, or the caller's read callback.
struct Source {
  std::string path;      // a local file; empty for byte input
  at::Tensor bytes;      // bytes in memory (uint8, 1-D, contiguous, on the CPU); undefined otherwise
  ReadAtFn read_at = nullptr;
  int64_t size = 0;      // of the callback's stream
  std::shared_ptr<std::mutex> read_lock;  // the callback's stream has one position: one read at a time
  std::vector<std::string> allowed_formats;  // demuxers that open other files the caller allows ("hls", ...)

  // The argument to name in errors ("path" or "source") and the input as messages show it.
  std::string argument() const { return path.empty() ? "source" : "path"; }
  std::string name() const;
};

// The AVIO side of one opened input: an AVIO context of the file protocol (local files only) or of our own over
// byte input, with its cursor. The demuxer on it (a FormatContextPtr) must be freed first.
struct Input {
  struct Cursor {
    const Source* source;
    int64_t pos;
  };
  std::unique_ptr<Cursor> cursor;
  AvioContextPtr avio;
  std::string refused_url;  // what the demuxer tried to open besides the input (refused)
};

// Opens `source` for demuxing on `input` (replacing what it held): ValueError naming the argument where FFmpeg
// cannot, or where the demuxer is one that opens other files or URLs (playlists, concatenation, image
// sequences, stream descriptions) and the source does not allow it by name. No demuxer may open anything besides
// the input unless allowed, and then only local files. `source` and `input` must outlive the demuxer.
FormatContextPtr open_demuxer(const Source& source, Input* input);

// ---- Packets and seek points -------------------------------------------------------------------------------

// One demuxed packet of the video stream, in decode order.
struct PacketInfo {
  int64_t pts, dts, pos, duration;
  bool key;
  bool safe_start;  // a keyframe decoding can start at (for H.264 / HEVC: an IDR picture)
  bool has_frame;   // false for packets flagged discard and empty packets: a sequential decode outputs no frame
};

// A packet decoding may start at: `frame` is the index of the first frame it outputs.
struct SeekPoint {
  int64_t packet, frame;
};

// ---- MP4/MOV sample tables (mp4.cpp) ------------------------------------------------------------------------

// The sample tables of one MP4/MOV track that the demuxer's index does not keep.
struct Mp4Track {
  std::vector<uint32_t> sizes;   // 'stsz': bytes of each sample
  std::vector<int64_t> offsets;  // 'ctts': composition (pts - dts) offset of each sample; empty without 'ctts'
};

// Finds the 'stsz' and 'ctts' tables of track `track_id` (tkhd). False for anything unexpected: no or several
// 'moov', fragments ('moof', 'mvex'), compact sizes ('stz2'), several tables, huge composition offsets (which
// FFmpeg ignores).
bool read_mp4_track(AVIOContext* pb, int track_id, Mp4Track* out);

// ---- Bitstream tests (bitstream.cpp) ------------------------------------------------------------------------

// H.264 / HEVC keyframe flags also mark recovery-point I-frames (open GOPs), after which FFmpeg's decoder may
// drop or reorder frames; only instantaneous decoder refresh pictures are safe starts. `nal_length` is the size of
// the length prefix (MP4/Matroska "avcC"/"hvcC" streams) or 0 for Annex B start codes.
bool has_idr_nal(const uint8_t* data, int size, int nal_length, bool hevc);

// Length-prefix size of H.264 / HEVC packets from the codec's extradata; 0 for Annex B.
int nal_length_size(const AVCodecParameters* par);

// Cuts a length-prefixed H.264 packet down to its NAL units that are not coded slices (parameter sets, SEI);
// false where there are none. Annex B packets (nal_length 0) are left whole (true).
bool keep_h264_headers(AVPacket* pkt, int nal_length);

// ---- Packet index (packet_index.cpp) ------------------------------------------------------------------------

struct Decoder;

// What opening a file learns from its packets (no decoding): frames in presentation order, keyframes, and the
// seek points decoding may start at.
struct PacketIndex {
  std::vector<PacketInfo> packets;      // decode order
  std::vector<int64_t> frame_of_packet;  // decode order -> frame index (-1: no frame)
  std::vector<int64_t> frame_keys;       // frame index -> pts (dts where not every packet has a pts)
  std::vector<int64_t> keyframes;
  std::vector<SeekPoint> seek_points;    // ascending; the first is {0, 0}
  int64_t num_frames = 0;
  bool from_sample_index = false;  // packets listed from the MP4/MOV sample index, not by reading them
  bool keys_known = false;         // every frame has a presentation key
  bool all_pts = false;            // every frame's packet has a pts (frames are then identified by pts)
  bool skip_nonref = false;        // requests may skip non-reference frames (cleared where that fails)
  std::string scan_error;          // the demuxer's error where it stopped before the end

  // Presentation key of a packet: its pts where the container gives every packet one, else its dts.
  int64_t key_of(const PacketInfo& p) const { return all_pts ? p.pts : p.dts; }
  // The last seek point at or before `frame`.
  SeekPoint seek_point_before(int64_t frame) const;
};

// Lists the packets of d's stream (from the MP4/MOV sample index where every check passes and read_all_packets
// is false, else by reading every packet) and sorts them into frames. Leaves d's demuxer anywhere.
PacketIndex index_packets(Decoder& d, bool read_all_packets);

// ---- Requests and the decode planner (planner.cpp) ----------------------------------------------------------

struct ThreadSws;

// One get_frames call.
struct Request {
  at::Tensor out, cpu_staging;  // cpu_staging: host frames of a CUDA result, converted before the copy
  int64_t frame_dim = 0;
  OutputSpec spec{};
  std::vector<int64_t> targets;             // frames to decode: sorted, unique
  std::vector<std::vector<int64_t>> slots;  // output positions of each target
  std::vector<uint8_t> wanted;              // per frame of the video
  std::vector<ThreadSws>* thread_sws = nullptr;  // the reader's libswscale state, one per torch thread
};

// Sorts and de-duplicates `indices` (all in [0, num_frames)) into req's targets, slots and wanted.
void plan_targets(const int64_t* indices, int64_t n, int64_t num_frames, Request* req);

// Why a decoder gave up on its part of a request; the reader fixes the index and redoes the request.
enum class WorkFailure {
  kNone,
  kPtsOrderMismatch,  // decoded timestamps disagree with the scanned pts order: stop skipping non-reference frames
  kBadSeekPoint,      // decoding from a seek point did not start with the frame the index expects: drop it
};

struct Pending {
  FramePtr frame;
  size_t target;
};

// libswscale state of one conversion thread, for the native-size uint8 path.
struct ThreadSws {
  SwsContextPtr ctx;
  int colorspace = -1, full_range = -1;  // the frame tags the context was last set for (AVColorSpace, AVColorRange)
  std::vector<uint8_t> padded;  // for widths libswscale's SIMD converters would leave a tail of
};

// The part of a request one decoder handles.
struct Work {
  std::vector<size_t> targets;  // positions in Request::targets, ascending
  std::vector<Pending> pending;
  std::vector<int64_t> missing;
  int64_t batch = 1;    // frames converted together
  bool serial = false;  // convert on the calling thread (decoders or FFmpeg's frame threads run in parallel)
  ThreadSws sws;
  WorkFailure failure = WorkFailure::kNone;
  SeekPoint bad_seek{0, 0};
  std::exception_ptr error;
};

// Cuts the targets into runs that start decoding at the same seek point and the runs into at most `threads`
// contiguous groups of about equal decoding work, one per decoder; returns each group's target positions. One
// group (one decoder with FFmpeg's threads) where splitting is not allowed or no cut is balanced.
std::vector<std::vector<size_t>> plan_decoders(const Request& req, const PacketIndex& index, int64_t threads,
                                               bool frame_threads, bool allow_split);

// ---- Decoder (decoder.cpp) ----------------------------------------------------------------------------------

// One demuxer + decoder over the file, and where it stands.
struct Decoder {
  // Opens `source`. stream_index < 0 (the main decoder): probes the streams (FFmpeg decodes a few frames for
  // that) and picks the video stream; else takes that stream and skips the probing where packets do not depend
  // on it (MP4/MOV: every packet comes from the sample index read with the header).
  Decoder(Source source, int stream_index);
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // Opens the codec with `threads` (0: FFmpeg's choice); with NVDEC where hw_device is not null.
  void open_codec(int threads, AVBufferRef* hw_device);
  AVStream* stream() const { return fmt->streams[stream_index]; }
  // Back to the start without trusting the container's seeking: reopen the file.
  void reopen();
  // Reads the next packet of the video stream into `packet`; false at the end (or a read error: truncated file).
  bool read_packet();
  // Decodes work.targets with the request's plan; failures land in work.failure / work.error.
  void decode(const PacketIndex& index, Request& req, Work& work);

  Source source;
  std::string path;  // the input as messages show it
  int stream_index = -1;
  bool probe;  // probe the streams on every open (the main decoder)
  Input input;
  FormatContextPtr fmt;  // the demuxer on `input` (declared after it: freed first)
  CodecContextPtr codec;
  PacketPtr packet = make_packet();
  FramePtr frame = make_frame();
  SwsContextPtr sws;  // pixel formats the kernels do not read -> GBRP
  bool positioned = false;    // next_packet / next_frame are valid
  bool held_packet = false;   // packet holds the next packet to send
  bool demux_eof = false;
  bool verify_next = false;   // check the first frame after a seek
  bool primed = false;        // has decoded the stream's first packet
  int64_t next_packet = 0;    // decode index of the next packet to send
  int64_t next_frame = 0;     // index of the next frame the decoder outputs
  int64_t decode_errors = 0;
  int64_t packets_without_frame = 0;  // sent since the decoder last output a frame
  std::vector<uint8_t> sent_skipped;  // frames whose packets were sent with AVDISCARD_NONREF since the last seek
  SeekPoint last_seek{0, 0};

 private:
  void open_input();
  void seek_to(const PacketIndex& index, const SeekPoint& sp);
  int64_t next_decoded_frame(const PacketIndex& index, const Request& req);
  int64_t identify(const PacketIndex& index, const AVFrame* f);
  void run_plan(const PacketIndex& index, Request& req, Work& w);
};

// ---- Conversion dispatch (conversion.cpp) -------------------------------------------------------------------

// The colour matrix and range of a decoded frame.
ColorTransform color_transform_of(const AVFrame* f);

// Hands d.frame (target position j of the request) to its conversion: NV12 CUDA frames to the CUDA kernel at
// once; host frames (after a GBRP step for formats the kernels do not read) wait in w.pending, converted
// w.batch at a time.
void enqueue_conversion(Decoder& d, Request& req, Work& w, size_t j);

// Converts w.pending on the CPU, frames x bands of rows in parallel (or serially where w.serial).
void flush_conversions(Request& req, Work& w);

// ---- VideoReader (video_reader.cpp; registered in binding.cpp) ----------------------------------------------

class VideoReader : public torch::CustomClassHolder {
 public:
  // read_all_packets: list the packets by reading them even where the sample index could be used (tests).
  VideoReader(Source source, int64_t cuda_device, int64_t threads, bool read_all_packets);

  int64_t num_frames() const { return index_.num_frames; }
  int64_t width() const;
  int64_t height() const;
  std::string codec() const;
  std::string pixel_format() const;
  std::string decode_device() const { return cuda_device_ >= 0 && hw_device_ ? "cuda" : "cpu"; }
  std::vector<int64_t> keyframes() const { return index_.keyframes; }
  std::string scan_error() const { return index_.scan_error; }
  double fps() const;
  // Seconds from the first to the end of the last frame in presentation order.
  double duration() const;
  // Presentation time of every frame in seconds, relative to the first frame.
  at::Tensor timestamps() const;
  at::Tensor get_frames(const at::Tensor& indices, int64_t height, int64_t width, const std::string& layout,
                        at::ScalarType dtype, std::vector<double> mean, std::vector<double> stdev, bool partial);
  // Releases the file and every decoder; later calls raise.
  void close();

  // Private (tests): how the reader worked.
  bool index_used() const { return index_.from_sample_index; }
  // How many decoders took the last request (1: one decoder with FFmpeg's threads; more: GOP-parallel).
  int64_t decoders_used() const { return decoders_used_; }
  // First frame of every seek point (frames decoding may start at), ascending.
  std::vector<int64_t> seek_frames() const;

 private:
  const AVStream* stream() const;
  BufferRefPtr open_nvdec() const;
  std::vector<int64_t> decode_request(Request& req);

  Source source_;
  std::string path_;  // the input as messages show it
  int64_t cuda_device_;
  int64_t threads_;
  BufferRefPtr hw_device_;
  std::unique_ptr<Decoder> main_;  // scans the file; decodes with FFmpeg's threads (or NVDEC)
  std::vector<std::unique_ptr<Decoder>> workers_;  // single-threaded decoders for GOP-parallel requests
  std::vector<ThreadSws> thread_sws_;
  PacketIndex index_;
  int64_t decoders_used_ = 0;
};

}  // namespace vidfast::video_reader
