// The decode planner: which frames a request decodes, and how they are shared among decoders.
#include <algorithm>
#include <vector>

#include "video_reader/video_reader.h"

namespace vidfast::video_reader {
namespace {

// Share of the work above an equal split at which one largest group makes a split not worth it where the codec
// has frame threads: a largest group over 1.4x an equal share. (Measured on 2 cores, H.264: two single-threaded
// decoders on halves of the work take about 30 % less time than one decoder with frame threads on all of it.)
constexpr int64_t kImbalanceNumerator = 14, kImbalanceDenominator = 10;

// Cuts runs (frames to decode each) into at most `parts` contiguous groups with the smallest largest group, and
// returns how many groups (group_of_run[r] says which). Where the codec has frame threads and the largest group
// would hold much more than an equal share, returns 1: one decoder with FFmpeg's frame threads keeps every core
// busy.
int64_t balanced_groups(const std::vector<int64_t>& run_frames, int64_t parts, bool frame_threads,
                        std::vector<int64_t>* group_of_run) {
  int64_t total = 0, largest_run = 0;
  for (int64_t f : run_frames) total += f, largest_run = std::max(largest_run, f);
  auto groups_needed = [&](int64_t cap) {
    int64_t groups = 1, load = 0;
    for (int64_t f : run_frames) {
      if (load + f > cap) ++groups, load = 0;
      load += f;
    }
    return groups;
  };
  int64_t lo = largest_run, hi = total;  // smallest cap that needs at most `parts` groups
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (groups_needed(mid) <= parts) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  if (frame_threads && lo * parts * kImbalanceDenominator > total * kImbalanceNumerator) return 1;
  int64_t group = 0, load = 0;
  for (size_t r = 0; r < run_frames.size(); ++r) {
    if (load + run_frames[r] > lo) ++group, load = 0;
    load += run_frames[r];
    (*group_of_run)[r] = group;
  }
  return group + 1;
}

}  // namespace

void plan_targets(const int64_t* indices, int64_t n, int64_t num_frames, Request* req) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return indices[a] < indices[b]; });
  for (int64_t k = 0; k < n; ++k) {
    if (req->targets.empty() || req->targets.back() != indices[order[k]]) {
      req->targets.push_back(indices[order[k]]);
      req->slots.emplace_back();
    }
    req->slots.back().push_back(order[k]);
  }
  req->wanted.assign(num_frames, 0);
  for (int64_t t : req->targets) req->wanted[t] = 1;
}

// Targets are cut into runs that start decoding at the same seek point. With several runs and threads to spare,
// the runs are cut into contiguous groups of about equal decoding work that single-threaded decoders take in
// parallel (codecs without frame threads, such as MPEG-4 part 2, gain the most); where no such cut is balanced
// (one run holds most of the work), one decoder with FFmpeg's own threads takes them all.
std::vector<std::vector<size_t>> plan_decoders(const Request& req, const PacketIndex& index, int64_t threads,
                                               bool frame_threads, bool allow_split) {
  std::vector<size_t> run_start;    // first target position of each run
  std::vector<int64_t> run_frames;  // frames each run decodes
  for (size_t j = 0; j < req.targets.size(); ++j) {
    const SeekPoint sp = index.seek_point_before(req.targets[j]);
    if (j == 0 || sp.frame != index.seek_point_before(req.targets[j - 1]).frame) {
      run_start.push_back(j);
      run_frames.push_back(0);
    }
    run_frames.back() = req.targets[j] - sp.frame + 1;
  }
  std::vector<int64_t> group_of_run(run_frames.size(), 0);
  int64_t groups = 1;
  if (allow_split && threads > 1 && run_frames.size() > 1) {
    groups = balanced_groups(run_frames, threads, frame_threads, &group_of_run);
  }
  std::vector<std::vector<size_t>> targets_of_group(groups);
  for (size_t r = 0; r < run_start.size(); ++r) {
    const size_t end = r + 1 < run_start.size() ? run_start[r + 1] : req.targets.size();
    for (size_t j = run_start[r]; j < end; ++j) targets_of_group[group_of_run[r]].push_back(j);
  }
  return targets_of_group;
}

}  // namespace vidfast::video_reader
