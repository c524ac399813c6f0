// Opening input the reader cannot trust (files from scraped datasets): a local file through FFmpeg's file
// protocol only, or byte input (memory, or the caller's read callback) through an AVIO context of our own. The
// demuxer is found by probing first, and one that opens other files or URLs named inside the input (playlists,
// concatenation lists, image sequences, stream descriptions) is refused unless the caller names it; no demuxer may
// open anything besides the input then (nested opens are refused), and an allowed one only local files.
#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

constexpr int kAvioBufferBytes = 1 << 16;

// Demuxers whose input names other files or URLs to open (FFmpeg's names).
constexpr const char* kIndirectionFormats[] = {"hls", "dash", "concat", "imf", "image2", "sdp", "rtsp",
                                               "rtp", "sap", "avisynth", "vapoursynth"};

bool allowed(const Source& s, const std::string& name) {
  return std::find(s.allowed_formats.begin(), s.allowed_formats.end(), name) != s.allowed_formats.end();
}

// The first of the demuxer's names (e.g. "mov,mp4,m4a,...") that is an indirection format the source does not
// allow; empty where there is none.
std::string refused_name(const Source& s, const char* names) {
  std::string list = names;
  for (size_t at = 0; at <= list.size();) {
    const size_t end = std::min(list.find(',', at), list.size());
    const std::string name = list.substr(at, end - at);
    for (const char* f : kIndirectionFormats) {
      if (name == f && !allowed(s, name)) return name;
    }
    at = end + 1;
  }
  return "";
}

bool allows_indirection(const Source& s) {
  for (const char* f : kIndirectionFormats) {
    if (allowed(s, f)) return true;
  }
  return false;
}

int read_bytes(void* opaque, uint8_t* buffer, int size) {
  auto* c = static_cast<Input::Cursor*>(opaque);
  const Source& s = *c->source;
  int64_t n;
  if (s.bytes.defined()) {
    n = std::min<int64_t>(size, s.bytes.numel() - c->pos);
    if (n > 0) std::memcpy(buffer, s.bytes.const_data_ptr<uint8_t>() + c->pos, static_cast<size_t>(n));
  } else {
    std::lock_guard<std::mutex> guard(*s.read_lock);
    n = s.read_at(c->pos, buffer, size);
    if (n < 0 || n > size) return AVERROR(EIO);
  }
  if (n <= 0) return AVERROR_EOF;
  c->pos += n;
  return static_cast<int>(n);
}

int64_t seek_bytes(void* opaque, int64_t offset, int whence) {
  auto* c = static_cast<Input::Cursor*>(opaque);
  const int64_t size = c->source->bytes.defined() ? c->source->bytes.numel() : c->source->size;
  whence &= ~AVSEEK_FORCE;
  if (whence == AVSEEK_SIZE) return size;
  int64_t to = -1;
  if (whence == SEEK_SET) to = offset;
  if (whence == SEEK_CUR) to = c->pos + offset;
  if (whence == SEEK_END) to = size + offset;
  if (to < 0 || to > size) return AVERROR(EINVAL);
  c->pos = to;
  return to;
}

// The demuxer's nested opens (a playlist's segments, a reference to another file): refused, and remembered for
// the error message.
int refuse_nested_open(AVFormatContext* s, AVIOContext**, const char* url, int, AVDictionary**) {
  auto* input = static_cast<Input*>(s->opaque);
  if (input->refused_url.empty()) input->refused_url = url ? url : "";
  return AVERROR(EPERM);
}

struct DictDeleter {
  void operator()(AVDictionary* d) const { av_dict_free(&d); }
};

}  // namespace

std::string Source::name() const {
  if (!path.empty()) return "'" + path + "'";
  return bytes.defined() ? "<bytes>" : "<file object>";
}

FormatContextPtr open_demuxer(const Source& source, Input* input) {
  const std::string arg = source.argument(), name = source.name();
  input->avio.reset();
  input->refused_url.clear();
  AVDictionary* raw_options = nullptr;
  av_dict_set(&raw_options, "protocol_whitelist", "file", 0);  // only local files, for the input and nested opens
  std::unique_ptr<AVDictionary, DictDeleter> options(raw_options);
  std::string url;
  if (!source.path.empty()) {
    url = "file:" + source.path;  // never a protocol or URL the path might spell
    AVDictionary* protocol_options = nullptr;
    av_dict_copy(&protocol_options, options.get(), 0);
    AVIOContext* pb = nullptr;
    const int ret = avio_open2(&pb, url.c_str(), AVIO_FLAG_READ, nullptr, &protocol_options);
    av_dict_free(&protocol_options);
    TORCH_CHECK_VALUE(ret >= 0, arg, ": cannot open ", name, ": ", av_error_text(ret));
    input->avio = AvioContextPtr(pb, AvioContextDeleter{false});
  } else {
    input->cursor = std::make_unique<Input::Cursor>(Input::Cursor{&source, 0});
    auto* buffer = static_cast<unsigned char*>(av_malloc(kAvioBufferBytes));
    TORCH_CHECK(buffer, "VideoReader: out of memory");
    AVIOContext* pb = avio_alloc_context(buffer, kAvioBufferBytes, 0, input->cursor.get(), read_bytes, nullptr,
                                         seek_bytes);
    if (!pb) av_free(buffer);
    TORCH_CHECK(pb, "VideoReader: out of memory");
    input->avio = AvioContextPtr(pb, AvioContextDeleter{true});
  }
  const AVInputFormat* format = nullptr;
  int ret = av_probe_input_buffer2(input->avio.get(), &format, url.c_str(), nullptr, 0, 0);
  TORCH_CHECK_VALUE(ret >= 0 && format, arg, ": cannot open ", name, " as a video: ", av_error_text(ret));
  const std::string refused = refused_name(source, format->name);
  TORCH_CHECK_VALUE(refused.empty(), arg, ": ", name, " is a '", refused, "' file (", format->long_name,
                    "), which makes FFmpeg open other files or URLs named inside it; refused. Pass "
                    "allowed_formats=(\"", refused, "\",) to open it anyway (local files only).");
  AVFormatContext* raw = avformat_alloc_context();
  TORCH_CHECK(raw, "VideoReader: out of memory");
  raw->pb = input->avio.get();
  raw->opaque = input;
  if (!allows_indirection(source)) raw->io_open = refuse_nested_open;
  AVDictionary* open_options = options.release();
  ret = avformat_open_input(&raw, url.c_str(), format, &open_options);  // frees raw itself where it fails
  av_dict_free(&open_options);
  TORCH_CHECK_VALUE(ret >= 0, arg, ": cannot open ", name, " as a video: ", av_error_text(ret),
                    input->refused_url.empty() ? "" : " (it names another file or URL to open, refused: '" +
                                                          input->refused_url + "')");
  return FormatContextPtr(raw);
}

}  // namespace vidfast::video_reader
