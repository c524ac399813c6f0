// Tiled CPU kernels of varlen attention (flash-attention's algorithm): for each (sequence, head, query block) the
// key/value blocks stream through an online softmax, so no score matrix larger than one tile exists. Products of
// tiles are float32 GEMMs (gemm.h: brgemm, the AVX2 micro-kernel or BLAS, by path); softmax passes use at::vec
// (exp_u20), compiled for the CPU_CAPABILITY of the including file. Work is spread over threads by a shared counter, largest tasks first, because sequence lengths differ.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/nvtx.h"
#include "varlen_attention/cpu/gemm.h"
#include "varlen_attention/cpu/kernel.h"
#if defined(CPU_CAPABILITY_AVX2)
#include "varlen_attention/cpu/exp_avx2.h"
#endif

namespace vidfast::attention::cpu::CPU_CAPABILITY {
namespace {

// Runs worker(next) on up to get_num_threads() threads; next() hands out task indices until none is left (-1).
template <typename Worker>
void parallel_dynamic(int64_t num_tasks, const Worker& worker) {
  if (num_tasks == 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < num_tasks ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (workers == 1) {
    worker(next);  // one task: BLAS may use every thread inside it
    release_brgemm();
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SingleThreadedBlas single_threaded;
    worker(next);
    release_brgemm();
  });
}

struct Task {
  int64_t cost;
  int32_t seq, head, row_begin, rows;
};

// Orders tasks by decreasing cost so the long ones start first and the short ones fill the gaps.
void sort_by_cost(std::vector<Task>& tasks) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
}

// A tile of `rows` rows of D values in the accumulation type (float32, float64 for float64 inputs), row-major with
// leading dimension `ld`: inputs already of that type are used in place, others are converted into `buffer`.
template <typename acc_t>
struct Tile {
  const acc_t* data;
  int64_t ld;
};

template <typename scalar_t, typename acc_t>
Tile<acc_t> load_tile(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t d, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {src, row_stride};
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * row_stride;
      acc_t* o = buffer + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] = acc_t(s[c]);
    }
    return {buffer, d};
  }
}

// The maximum of s[0, n).
template <typename acc_t>
acc_t row_maximum(const acc_t* s, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vmax(-INFINITY);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  acc_t lanes[Vec::size()];
  vmax.store(lanes);
  acc_t m = -INFINITY;
  for (int64_t i = 0; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - shift) for j < n; returns their sum. The AVX2 build's float32 rows take exp_avx2.h's shorter
// polynomial (5% faster forwards on Zen 3), for the forward and the backward's recomputation alike.
template <typename acc_t>
acc_t exp_and_sum(acc_t* s, int64_t n, acc_t shift) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return exp_and_sum_avx2(s, n, shift);
#endif
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vshift(shift);
  Vec vsum(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - vshift).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  acc_t lanes[Vec::size()];
  vsum.store(lanes);
  acc_t sum = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// Whether this build and CPU keep 16-bit tiles as they are and multiply them on brgemm (products accumulate in
// float32; P is rounded to scalar_t for P V, as flash-attention does on GPUs). Otherwise tiles are widened to
// float32 first. Only the AVX-512 build asks: the micro-kernels need AVX512-BF16 or newer. (On this project's AMD
// machine, which has AVX512-BF16 but not AVX512-FP16, bfloat16 forwards ran 1.5x faster than widened tiles and
// float16 ones 5% faster.)
template <typename scalar_t>
bool use_half_tiles([[maybe_unused]] int64_t d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
    return d % 2 == 0 && brgemm_works<scalar_t>();
  }
#endif
  return false;
}

// A tile of the 16-bit inputs as they are (`ld` elements per row) for the half-tile path; data is null otherwise.
template <typename scalar_t>
struct HalfTile {
  const scalar_t* data;
  int64_t ld;
};

// An operand of the score products (Q or K rows, `ld` apart): the 16-bit rows as they are where half tiles are in
// use, else widened into `buffer`.
template <typename scalar_t, typename acc_t>
std::pair<HalfTile<scalar_t>, Tile<acc_t>> score_operand(bool half_tiles, const scalar_t* rows_ptr, int64_t ld,
                                                          int64_t rows, int64_t d, acc_t* buffer) {
  if (half_tiles) return {HalfTile<scalar_t>{rows_ptr, ld}, Tile<acc_t>{}};
  return {HalfTile<scalar_t>{nullptr, ld}, load_tile(rows_ptr, ld, rows, d, buffer)};
}

// Row r of a 16-bit operand from float32 values: n of them, and a zero after an odd n (16-bit products take the
// inner dimension in pairs).
template <typename acc_t, typename scalar_t>
void to_half_row(const acc_t* row, int64_t n, scalar_t* out) {
  at::vec::convert(row, out, n);
  if (n % 2) out[n] = scalar_t(0.0f);
}

struct SeqBounds {
  int64_t q0, lq, k0, lk;
};

SeqBounds bounds(const int32_t* cu_q, const int32_t* cu_k, int64_t b) {
  return {cu_q[b], int64_t(cu_q[b + 1]) - cu_q[b], cu_k[b], int64_t(cu_k[b + 1]) - cu_k[b]};
}

// Whether the forward pass packs each key block's K^T and V once into the float32 panels of the AVX2 micro-kernel
// (gemm_avx2.h; 16-bit inputs widened on the way) and runs query rows through them in strips of kStripRows: a
// strip's scores then stay in L1 from Q K^T through the softmax to P V, where a whole [kBlockQ, kBlockK] tile of
// them (512 KiB) would fill a Zen 3 core's L2 and evict the K and V panels.
template <typename acc_t>
bool use_panels() {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return selected_path() == Path::kAvx2;
#endif
  return false;
}

constexpr int64_t kStripRows = 12;  // two micro-kernel rows (gemm_avx2.h): 24 KiB of scores
constexpr int64_t kPanelChunk = 128;  // keys per pass of P V over the V panels (gemm_panels_accumulate_chunked)

// Query rows per forward task. The panel path packs K and V once per task, so it takes longer blocks, up to
// kPanelBlockQ rows (its scores stay in strips: a longer block costs only output accumulators, 128 KiB at 512 x
// 64), and cuts a sequence into blocks of equal length in whole strips, so no short last block packs every key for
// a few rows (1568 queries: 4 x 396 rather than 6 x 256 + 32; 6% faster on the half-kept workload).
constexpr int64_t kPanelBlockQ = 516;  // 43 strips

int64_t forward_block_rows(bool panels, int64_t lq) {
  if (!panels) return kBlockQ;
  const int64_t blocks = std::max<int64_t>(1, ceil_div(lq, kPanelBlockQ));
  return ceil_div(ceil_div(lq, blocks), kStripRows) * kStripRows;
}

// Keys per block of a forward task, likewise cut into equal blocks of whole 16-key panels on the panel path (1568
// keys: 4 x 400 rather than 3 x 512 + 32, a block that would pay the packing and the softmax rescaling of every
// strip for 32 keys).
int64_t forward_key_block(bool panels, int64_t keys) {
  if (!panels) return kBlockK;
  const int64_t blocks = std::max<int64_t>(1, ceil_div(keys, kBlockK));
  return ceil_div(ceil_div(keys, blocks), 16) * 16;
}

// Tiles of the AVX2 path's backward (below): whole micro-kernel rows (6) and panels (16) on both sides. On Zen 3,
// 72-144 query rows x 144-240 keys ran within noise of each other, and forward + backward 4-25% faster than with
// the other paths' loop on [256, 512] tiles (2 threads, interleaved in one process).
constexpr int64_t kPanelBackwardBlockQ = 96;
constexpr int64_t kPanelBackwardBlockK = 192;

// Scores of one tile, S = scale Q K^T (rows x n, row stride ld), each row's keys past its causal end zeroed;
// then row_fn(r, row, valid) with the number of keys row r sees in this tile. The forward and backward passes both
// come through here, so the backward recomputes exactly the forward's scores: from K^T packed in `k_panels` when
// given (the forward's panel path), from the 16-bit tiles q16, k16 when they are given (K^T packed into `pack`),
// else from the float tiles qt, kt.
template <typename scalar_t, typename acc_t, typename RowFn>
void score_tile(const Params& p, const SeqBounds& s, int64_t i0, int64_t kb, int64_t rows, int64_t n, int64_t d,
                acc_t scale, const Tile<acc_t>& qt, const Tile<acc_t>& kt, const HalfTile<scalar_t>& q16,
                const HalfTile<scalar_t>& k16, scalar_t* pack, [[maybe_unused]] const acc_t* k_panels,
                acc_t* scores, int64_t ld, RowFn&& row_fn) {
  using Vec = at::vec::Vectorized<acc_t>;
  bool scaled = true, done = false;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (k_panels != nullptr) {
      gemm_panels(false, rows, n, d, scale, qt.data, qt.ld, k_panels, false, scores, ld, true);
      done = true;
    }
  }
#endif
  if constexpr (sizeof(scalar_t) == 2) {
    if (q16.data != nullptr) {
      gemm_half(true, rows, n, d, q16.data, q16.ld, k16.data, k16.ld, pack, false, scores, ld);
      scaled = false;
      done = true;
    }
  }
  if (!done) gemm(false, true, rows, n, d, scale, qt.data, qt.ld, kt.data, kt.ld, acc_t(0), scores, ld);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = scores + r * ld;
    const int64_t valid = std::clamp<int64_t>(key_end(i0 + r, s.lq, s.lk, p.causal) - kb, 0, n);
    if (!scaled) at::vec::map([scale](Vec x) { return x * Vec(scale); }, row, row, valid);
    std::fill(row + valid, row + n, acc_t(0));
    row_fn(r, row, valid);
  }
}

template <typename scalar_t>
void forward_typed(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const int32_t* cu_q, const int32_t* cu_k, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = acc_t(p.scale);
  const int64_t d = p.head_dim;
  const bool half_tiles = use_half_tiles<scalar_t>(d);
  const bool panels = use_panels<acc_t>();
  const int64_t strip = panels ? kStripRows : kBlockQ;  // query rows per pass through a key block
  const int64_t block_q = panels ? kPanelBlockQ : kBlockQ;  // the longest query block
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqBounds s = bounds(cu_q, cu_k, b);
    const int64_t block_rows = forward_block_rows(panels, s.lq);
    for (int64_t i0 = 0; i0 < s.lq; i0 += block_rows) {
      const int64_t rows = std::min(block_rows, s.lq - i0);
      const int64_t keys = key_end(i0 + rows - 1, s.lq, s.lk, p.causal);
      for (int64_t h = 0; h < p.heads; ++h) {
        tasks.push_back({rows * (keys + d), int32_t(b), int32_t(h), int32_t(i0), int32_t(rows)});
      }
    }
  }
  sort_by_cost(tasks);

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);

  parallel_dynamic(int64_t(tasks.size()), [&](auto next) {
    // Which buffers this path uses: half tiles, panels, or float tiles (wide).
    const int64_t half = half_tiles ? 1 : 0, panel = panels ? 1 : 0, wide = 1 - half;
    const int64_t kv_tiles = wide * (1 - panel);
    std::vector<acc_t> q_buf(wide * block_q * d), k_buf(kv_tiles * kBlockK * d), v_buf(kv_tiles * kBlockK * d);
    const int64_t panel_size = panel * kBlockK * ceil_div(d, 16) * 16;  // K^T or V in panels of 16 columns
    std::vector<acc_t> k_panels(panel_size), v_panels(panel_size);
    std::vector<acc_t> probs(strip * kBlockK), acc(block_q * d), row_max(block_q), row_sum(block_q);
    std::vector<scalar_t> probs16(half * kBlockQ * kBlockK), pack(half * kBlockK * d);
    for (int64_t t = next(); t >= 0; t = next()) {
      const Task& task = tasks[t];
      const SeqBounds s = bounds(cu_q, cu_k, task.seq);
      const int64_t h = task.head, hk = h / p.group(), i0 = task.row_begin, rows = task.rows;
      const scalar_t* q_rows = q_ptr + (s.q0 + i0) * qs0 + h * qs1;
      const auto [q16, qt] = score_operand(half_tiles, q_rows, qs0, rows, d, q_buf.data());
      std::fill(row_max.begin(), row_max.end(), -INFINITY);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      std::fill(acc.begin(), acc.begin() + rows * d, acc_t(0));
      const int64_t keys = key_end(i0 + rows - 1, s.lq, s.lk, p.causal), key_block = forward_key_block(panels, keys);
      for (int64_t kb = 0; kb < keys; kb += key_block) {
        const int64_t n = std::min(key_block, keys - kb);
        const scalar_t* k_rows = k_ptr + (s.k0 + kb) * ks0 + hk * ks1;
        const scalar_t* v_rows = v_ptr + (s.k0 + kb) * vs0 + hk * vs1;
        HalfTile<scalar_t> k16{nullptr, ks0};
        Tile<acc_t> kt{}, vt{};
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (std::is_same_v<acc_t, float>) {
          if (panels) {
            pack_panels(true, d, n, k_rows, ks0, k_panels.data());  // K^T [d, n]
            pack_panels(false, n, d, v_rows, vs0, v_panels.data());  // V [n, d]
          }
        }
#endif
        if (!panels) {
          std::tie(k16, kt) = score_operand(half_tiles, k_rows, ks0, n, d, k_buf.data());
          if (!half_tiles) vt = load_tile(v_rows, vs0, n, d, v_buf.data());
        }
        for (int64_t r0 = 0; r0 < rows; r0 += strip) {
          const int64_t m = std::min(strip, rows - r0);
          const HalfTile<scalar_t> q16_strip{q16.data ? q16.data + r0 * q16.ld : nullptr, q16.ld};
          const Tile<acc_t> qt_strip{qt.data ? qt.data + r0 * qt.ld : nullptr, qt.ld};
          acc_t* acc_strip = acc.data() + r0 * d;
          score_tile(p, s, i0 + r0, kb, m, n, d, scale, qt_strip, kt, q16_strip, k16, pack.data(),
                     panels ? k_panels.data() : static_cast<const acc_t*>(nullptr), probs.data(), kBlockK,
                     [&](int64_t r, acc_t* row, int64_t valid) {
                       if (valid > 0) {
                         acc_t& m_row = row_max[r0 + r];
                         const acc_t m_new = std::max(m_row, row_maximum(row, valid));
                         const acc_t alpha = softmax_rescale(m_row, m_new);
                         row_sum[r0 + r] = row_sum[r0 + r] * alpha + exp_and_sum(row, valid, softmax_shift(m_new));
                         m_row = m_new;
                         if (alpha != acc_t(1)) {
                           acc_t* a = acc_strip + r * d;
#pragma omp simd
                           for (int64_t c = 0; c < d; ++c) a[c] *= alpha;
                         }
                       }
                       if (half_tiles) to_half_row(row, n, probs16.data() + r * kBlockK);
                     });
#if defined(CPU_CAPABILITY_AVX2)
          if constexpr (std::is_same_v<acc_t, float>) {
            if (panels) {
              gemm_panels_accumulate_chunked(m, d, n, probs.data(), kBlockK, v_panels.data(), acc_strip, d, kPanelChunk);
              continue;
            }
          }
#endif
          if constexpr (sizeof(scalar_t) == 2) {
            if (half_tiles) {
              gemm_half(false, m, d, n, probs16.data(), kBlockK, v_rows, vs0, pack.data(), true, acc_strip, d);
              continue;
            }
          }
          gemm(false, false, m, d, n, acc_t(1), probs.data(), kBlockK, vt.data, vt.ld, acc_t(1), acc_strip, d);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t token = s.q0 + i0 + r;
        const acc_t inv = softmax_inverse_sum(row_sum[r]);
        const acc_t* a = acc.data() + r * d;
        scalar_t* o = out_ptr + (token * p.heads + h) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = scalar_t(a[c] * inv);
        lse_ptr[h * p.total_q + token] = softmax_lse(row_max[r], row_sum[r]);
      }
    }
  });
}

// The softmax backward's row terms of `rows` query rows of head h from token0 on: delta_i = sum_c dO_ic O_ic -
// dlse_i (lse's own gradient enters here) and the shift that recomputes p = exp(s - shift) from the forward's lse.
template <typename scalar_t, typename acc_t>
void backward_row_terms(const Params& p, int64_t h, int64_t token0, int64_t rows, const Tile<acc_t>& dot,
                        const scalar_t* o_rows, int64_t os0, const acc_t* lse_ptr, const acc_t* dlse_ptr, acc_t* delta,
                        acc_t* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* o_row = o_rows + r * os0;
    const acc_t* do_row = dot.data + r * dot.ld;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < p.head_dim; ++c) sum += do_row[c] * acc_t(o_row[c]);
    const int64_t li = h * p.total_q + token0 + r;
    delta[r] = sum - (dlse_ptr ? dlse_ptr[li] : acc_t(0));
    shift[r] = backward_shift(lse_ptr[li]);
  }
}

// dS = scale P (dP - delta) in place of dP, for the n keys of one query row.
template <typename acc_t>
void softmax_grad_row(const acc_t* probs_row, acc_t* dprobs_row, int64_t n, acc_t scale, acc_t delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dprobs_row[j] = scale * probs_row[j] * (dprobs_row[j] - delta);
}

// dst row r = src row r (float32 accumulators, d per row) in scalar_t, for rows `stride` elements apart.
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t rows, int64_t d, scalar_t* dst, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* a = src + r * d;
    scalar_t* o = dst + r * stride;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] = scalar_t(a[c]);
  }
}

// One task per (sequence, key/value head): it owns the gradients of its keys and values (accumulated in float32
// over every query head of its group) and, query block by query block, the complete gradient of those queries,
// so no two threads ever write the same output.
template <typename scalar_t>
void backward_typed(const Params& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                    const std::optional<at::Tensor>& grad_lse, const int32_t* cu_q, const int32_t* cu_k,
                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = acc_t(p.scale);
  const int64_t d = p.head_dim, group = p.group();
  std::vector<Task> tasks;
  int64_t longest_q = 0, longest_k = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqBounds s = bounds(cu_q, cu_k, b);
    longest_q = std::max(longest_q, s.lq);
    longest_k = std::max(longest_k, s.lk);
    int64_t pairs = 0;  // visible (query, key) pairs, rounded to blocks
    for (int64_t i0 = 0; i0 < s.lq; i0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, s.lq - i0);
      pairs += rows * (key_end(i0 + rows - 1, s.lq, s.lk, p.causal) + d);
    }
    for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
      tasks.push_back({group * pairs + s.lk * d, int32_t(b), int32_t(hk), 0, int32_t(s.lq)});
    }
  }
  sort_by_cost(tasks);

  const scalar_t* do_ptr = grad_out.data_ptr<scalar_t>();
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const scalar_t* o_ptr = out.data_ptr<scalar_t>();
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* dlse_ptr = grad_lse ? grad_lse->data_ptr<acc_t>() : nullptr;
  scalar_t* dq_ptr = grad_q.data_ptr<scalar_t>();
  scalar_t* dk_ptr = grad_k.data_ptr<scalar_t>();
  scalar_t* dv_ptr = grad_v.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t dos0 = grad_out.stride(0), dos1 = grad_out.stride(1);

#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_panels<acc_t>()) {
      // The AVX2 path, in flash-attention 2's loop order: key blocks outside, query blocks inside, with tiles small
      // enough that a block pair's S, P and dS, the key block's K^T, V^T and K panels and its dK, dV accumulators
      // all stay in L2 (a [256, 512] P and dS of the loop below are 1 MiB, twice a Zen 3 core's L2). Each head's Q
      // and dO are packed once into panels per query block (the B operands of dK += dS^T Q and dV += P^T dO); its
      // dQ accumulates in float32 over the key blocks.
      constexpr int64_t block_q = kPanelBackwardBlockQ, block_k = kPanelBackwardBlockK;
      parallel_dynamic(int64_t(tasks.size()), [&](auto next) {
        const int64_t dp = ceil_div(d, kPanel) * kPanel, widen = std::is_same_v<scalar_t, float> ? 0 : 1;
        std::vector<float> q_buf(widen * longest_q * d), do_buf(widen * longest_q * d);
        std::vector<float> q_panels(longest_q * dp), do_panels(longest_q * dp), dq_acc(longest_q * d);
        std::vector<float> delta(longest_q), shift(longest_q), dk_acc(longest_k * d), dv_acc(longest_k * d);
        std::vector<float> kt_panels(panel_floats(d, block_k)), vt_panels(panel_floats(d, block_k));
        std::vector<float> k_panels(panel_floats(block_k, d)), probs(block_q * block_k), dprobs(block_q * block_k);
        for (int64_t t = next(); t >= 0; t = next()) {
          const Task& task = tasks[t];
          const SeqBounds s = bounds(cu_q, cu_k, task.seq);
          const int64_t hk = task.head;
          std::fill(dk_acc.begin(), dk_acc.begin() + s.lk * d, 0.0f);
          std::fill(dv_acc.begin(), dv_acc.begin() + s.lk * d, 0.0f);
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            const Tile<float> qt = load_tile(q_ptr + s.q0 * qs0 + h * qs1, qs0, s.lq, d, q_buf.data());
            const Tile<float> dot = load_tile(do_ptr + s.q0 * dos0 + h * dos1, dos0, s.lq, d, do_buf.data());
            backward_row_terms(p, h, s.q0, s.lq, dot, o_ptr + s.q0 * os0 + h * os1, os0, lse_ptr, dlse_ptr,
                               delta.data(), shift.data());
            for (int64_t i0 = 0; i0 < s.lq; i0 += block_q) {
              const int64_t rows = std::min(block_q, s.lq - i0);
              pack_panels(false, rows, d, qt.data + i0 * qt.ld, qt.ld, q_panels.data() + i0 * dp);
              pack_panels(false, rows, d, dot.data + i0 * dot.ld, dot.ld, do_panels.data() + i0 * dp);
            }
            std::fill(dq_acc.begin(), dq_acc.begin() + s.lq * d, 0.0f);
            for (int64_t kb = 0; kb < s.lk; kb += block_k) {
              const int64_t n = std::min(block_k, s.lk - kb);
              const scalar_t* k_rows = k_ptr + (s.k0 + kb) * ks0 + hk * ks1;
              const scalar_t* v_rows = v_ptr + (s.k0 + kb) * vs0 + hk * vs1;
              pack_panels(true, d, n, k_rows, ks0, kt_panels.data());  // K^T [d, n]
              pack_panels(true, d, n, v_rows, vs0, vt_panels.data());  // V^T [d, n]
              pack_panels(false, n, d, k_rows, ks0, k_panels.data());  // K [n, d]
              float* dk_block = dk_acc.data() + kb * d;
              float* dv_block = dv_acc.data() + kb * d;
              for (int64_t i0 = 0; i0 < s.lq; i0 += block_q) {
                const int64_t rows = std::min(block_q, s.lq - i0);
                if (key_end(i0 + rows - 1, s.lq, s.lk, p.causal) <= kb) continue;  // no row sees this key block
                // The forward's scores to the last bit (the same panels, the same order of products), so P matches
                // the forward's lse.
                score_tile<scalar_t, float>(p, s, i0, kb, rows, n, d, scale, {qt.data + i0 * qt.ld, qt.ld}, {},
                                            {nullptr, 0}, {nullptr, 0}, nullptr, kt_panels.data(), probs.data(),
                                            block_k, [&](int64_t r, float* row, int64_t valid) {
                                              exp_and_sum(row, valid, shift[i0 + r]);
                                            });
                gemm_panels(false, rows, n, d, 1.0f, dot.data + i0 * dot.ld, dot.ld, vt_panels.data(), false,
                            dprobs.data(), block_k);  // dP = dO V^T
                for (int64_t r = 0; r < rows; ++r) {
                  softmax_grad_row(probs.data() + r * block_k, dprobs.data() + r * block_k, n, scale, delta[i0 + r]);
                }
                gemm_panels(true, n, d, rows, 1.0f, probs.data(), block_k, do_panels.data() + i0 * dp, true,
                            dv_block, d);  // dV += P^T dO
                gemm_panels(true, n, d, rows, 1.0f, dprobs.data(), block_k, q_panels.data() + i0 * dp, true,
                            dk_block, d);  // dK += dS^T Q
                gemm_panels(false, rows, d, n, 1.0f, dprobs.data(), block_k, k_panels.data(), true,
                            dq_acc.data() + i0 * d, d);  // dQ += dS K
              }
            }
            store_rows(dq_acc.data(), s.lq, d, dq_ptr + (s.q0 * p.heads + h) * d, p.heads * d);
          }
          store_rows(dk_acc.data(), s.lk, d, dk_ptr + (s.k0 * p.kv_heads + hk) * d, p.kv_heads * d);
          store_rows(dv_acc.data(), s.lk, d, dv_ptr + (s.k0 * p.kv_heads + hk) * d, p.kv_heads * d);
        }
      });
      return;
    }
  }
#endif
  const bool half_tiles = use_half_tiles<scalar_t>(d);
  parallel_dynamic(int64_t(tasks.size()), [&](auto next) {
    const int64_t wide = half_tiles ? 0 : 1, half = 1 - wide;  // which buffers this path uses
    std::vector<scalar_t> pack(half * kBlockK * d), dprobs16(half * kBlockQ * kBlockK);
    std::vector<acc_t> q_buf(kBlockQ * d), do_buf(kBlockQ * d), k_buf(wide * kBlockK * d), v_buf(wide * kBlockK * d);
    std::vector<acc_t> probs(kBlockQ * kBlockK), dprobs(kBlockQ * kBlockK), dq_acc(kBlockQ * d);
    std::vector<acc_t> shift(kBlockQ), delta(kBlockQ), dk_acc(longest_k * d), dv_acc(longest_k * d);
    for (int64_t t = next(); t >= 0; t = next()) {
      const Task& task = tasks[t];
      const SeqBounds s = bounds(cu_q, cu_k, task.seq);
      const int64_t hk = task.head;
      std::fill(dk_acc.begin(), dk_acc.begin() + s.lk * d, acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + s.lk * d, acc_t(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < s.lq; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, s.lq - i0), token0 = s.q0 + i0;
          const scalar_t* q_rows = q_ptr + token0 * qs0 + h * qs1;
          const HalfTile<scalar_t> q16{half_tiles ? q_rows : nullptr, qs0};
          const Tile<acc_t> qt = load_tile(q_rows, qs0, rows, d, q_buf.data());
          const scalar_t* do_rows = do_ptr + token0 * dos0 + h * dos1;
          const Tile<acc_t> dot = load_tile(do_rows, dos0, rows, d, do_buf.data());
          backward_row_terms(p, h, token0, rows, dot, o_ptr + token0 * os0 + h * os1, os0, lse_ptr, dlse_ptr,
                             delta.data(), shift.data());
          std::fill(dq_acc.begin(), dq_acc.begin() + rows * d, acc_t(0));
          const int64_t keys = key_end(i0 + rows - 1, s.lq, s.lk, p.causal);
          for (int64_t kb = 0; kb < keys; kb += kBlockK) {
            const int64_t n = std::min(kBlockK, keys - kb);
            const scalar_t* k_rows = k_ptr + (s.k0 + kb) * ks0 + hk * ks1;
            const scalar_t* v_rows = v_ptr + (s.k0 + kb) * vs0 + hk * vs1;
            const auto [k16, kt] = score_operand(half_tiles, k_rows, ks0, n, d, k_buf.data());
            const Tile<acc_t> vt = half_tiles ? Tile<acc_t>{} : load_tile(v_rows, vs0, n, d, v_buf.data());
            // The forward's scores to the last bit, so P matches the forward's lse.
            score_tile(p, s, i0, kb, rows, n, d, scale, qt, kt, q16, k16, pack.data(),
                       static_cast<const acc_t*>(nullptr), probs.data(), kBlockK,
                       [&](int64_t r, acc_t* row, int64_t valid) { exp_and_sum(row, valid, shift[r]); });
            // dV += P^T dO, dP = dO V^T, dS = scale P * (dP - delta), dQ += dS K, dK += dS^T Q. With 16-bit tiles
            // dP and dQ run on 16-bit brgemm (dS rounded to scalar_t for dQ); dV and dK, whose left operands are
            // transposed, on float32.
            gemm(true, false, n, d, rows, acc_t(1), probs.data(), kBlockK, dot.data, dot.ld, acc_t(1),
                 dv_acc.data() + kb * d, d);
            if constexpr (sizeof(scalar_t) == 2) {
              if (half_tiles) {
                gemm_half(true, rows, n, d, do_rows, dos0, v_rows, vs0, pack.data(), false, dprobs.data(), kBlockK);
              }
            }
            if (!half_tiles) {
              gemm(false, true, rows, n, d, acc_t(1), dot.data, dot.ld, vt.data, vt.ld, acc_t(0), dprobs.data(),
                   kBlockK);
            }
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* ds = dprobs.data() + r * kBlockK;
              softmax_grad_row(probs.data() + r * kBlockK, ds, n, scale, delta[r]);
              if (half_tiles) to_half_row(ds, n, dprobs16.data() + r * kBlockK);
            }
            if constexpr (sizeof(scalar_t) == 2) {
              if (half_tiles) {
                gemm_half(false, rows, d, n, dprobs16.data(), kBlockK, k_rows, ks0, pack.data(), true, dq_acc.data(), d);
              }
            }
            if (!half_tiles) {
              gemm(false, false, rows, d, n, acc_t(1), dprobs.data(), kBlockK, kt.data, kt.ld, acc_t(1), dq_acc.data(),
                   d);
            }
            gemm(true, false, n, d, rows, acc_t(1), dprobs.data(), kBlockK, qt.data, qt.ld, acc_t(1),
                 dk_acc.data() + kb * d, d);
          }
          store_rows(dq_acc.data(), rows, d, dq_ptr + (token0 * p.heads + h) * d, p.heads * d);
        }
      }
      store_rows(dk_acc.data(), s.lk, d, dk_ptr + (s.k0 * p.kv_heads + hk) * d, p.kv_heads * d);
      store_rows(dv_acc.data(), s.lk, d, dv_ptr + (s.k0 * p.kv_heads + hk) * d, p.kv_heads * d);
    }
  });
}

}  // namespace

bool brgemm_available() { return brgemm_works<float>(); }

void forward(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, at::Tensor& out, at::Tensor& lse) {
  VIDFAST_NVTX_RANGE("attn/varlen_fwd");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
    forward_typed<scalar_t>(p, q, k, v, cu_seqlens_q.data_ptr<int32_t>(), cu_seqlens_k.data_ptr<int32_t>(), out,
                            lse);
  });
}

void backward(const Params& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
              const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
              const at::Tensor& cu_seqlens_k, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  VIDFAST_NVTX_RANGE("attn/varlen_bwd");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_bwd_cpu", [&] {
    backward_typed<scalar_t>(p, grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q.data_ptr<int32_t>(),
                             cu_seqlens_k.data_ptr<int32_t>(), grad_q, grad_k, grad_v);
  });
}

}  // namespace vidfast::attention::cpu::CPU_CAPABILITY
