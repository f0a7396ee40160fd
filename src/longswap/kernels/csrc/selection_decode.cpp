// One decoding step of a block-selection pattern on CPU: one query row per sequence.
//
// The query of sequence b sits at position L - 1 and sees its static keys (the pattern's
// own block, window and sinks: `static_keys`, sorted) plus the complete key blocks it
// selects: the `top_k` best-scoring candidates (`Selection.candidates`: complete blocks
// before its own that the static part does not show in full), ties going to the more
// recent block, a NaN score ranking above every number and -inf never chosen, by the rule
// of `top_places` (patterns/block_topk.py; `rank_key` of attention_rows.h). Scores come one
// row per query head, or one per KV group shared by the group's heads.
//
// One task per (sequence, KV head): it selects the blocks of each of its score rows, then
// each of its query heads reads exactly the runs of keys it sees (a selected block's keys
// that are also static are read once, with the static ones), in two passes: scores and
// their maximum, then the exponentials and the weighted sum of values. Keys and values may
// be float32, bfloat16 or float16, read in place from a growing cache's buffer (rows must
// be contiguous); arithmetic is float32. Products are vectorized loops (ATen's
// Vectorized<float>): BLAS per run of 64 keys measured slower, its per-call cost dominating.
// No -ffast-math: NaN and infinities follow IEEE.
#include "attention_rows.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using Run = std::pair<int64_t, int64_t>;  // keys [first, second)

// One row of D values as float32: in place for float32 rows, else converted into `scratch`.
template <typename T>
const float* as_float(const T* row, int64_t dim, float* scratch) {
  for (int64_t i = 0; i < dim; ++i) scratch[i] = static_cast<float>(row[i]);
  return scratch;
}
template <>
const float* as_float<float>(const float* row, int64_t, float*) {
  return row;
}

float dot(const float* a, const float* b, int64_t dim) {
  Vec sum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= dim; i += Vec::size())
    sum = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), sum);
  float total = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum);
  for (; i < dim; ++i) total += a[i] * b[i];
  return total;
}

// out[0, dim) += w * x[0, dim)
void axpy(float w, const float* x, float* out, int64_t dim) {
  Vec wv(w);
  int64_t i = 0;
  for (; i + Vec::size() <= dim; i += Vec::size())
    at::vec::fmadd(wv, Vec::loadu(x + i), Vec::loadu(out + i)).store(out + i);
  for (; i < dim; ++i) out[i] += w * x[i];
}

// The selected blocks of one score row, in block order: of the `places` best-ranked
// `candidates`, those chosen (top_places's rule).
std::vector<int64_t> select(const float* scores, const std::vector<int64_t>& candidates,
                            int64_t places) {
  using longswap_rows::kFirstChosen, longswap_rows::rank_key, longswap_rows::rank_order;
  std::vector<int64_t> keys;
  for (int64_t j : candidates) keys.push_back(rank_key(rank_order(scores[j]), j));
  places = std::min<int64_t>(places, keys.size());
  std::partial_sort(keys.begin(), keys.begin() + places, keys.end(), std::greater<int64_t>());
  std::vector<int64_t> chosen;
  for (int64_t i = 0; i < places; ++i)
    if (keys[i] >= kFirstChosen) chosen.push_back(longswap_rows::ranked_block(keys[i]));
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

// Runs of consecutive keys: the static ones, then each selected block minus its static keys.
std::vector<Run> key_runs(const std::vector<Run>& fixed, const std::vector<int64_t>& blocks,
                          int64_t block_size) {
  std::vector<Run> runs(fixed);
  for (int64_t blk : blocks) {
    int64_t lo = blk * block_size, hi = lo + block_size;
    for (const Run& s : fixed) {  // fixed runs are sorted and apart
      if (s.second <= lo || s.first >= hi) continue;
      if (s.first > lo) runs.emplace_back(lo, s.first);
      lo = std::max(lo, s.second);
    }
    if (lo < hi) runs.emplace_back(lo, hi);
  }
  return runs;
}

template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t k_row, int64_t v_row,
            const std::vector<Run>& runs, int64_t dim, int64_t dim_v, float scale,
            std::vector<float>& p, std::vector<float>& scratch, float* out) {
  int64_t count = 0;
  for (const Run& r : runs) count += r.second - r.first;
  p.resize(count);
  float high = -std::numeric_limits<float>::infinity();
  int64_t at = 0;
  for (const Run& r : runs)
    for (int64_t j = r.first; j < r.second; ++j, ++at) {
      p[at] = scale * dot(q, as_float(k + j * k_row, dim, scratch.data()), dim);
      high = std::max(high, p[at]);
    }
  std::fill(out, out + dim_v, 0.f);
  if (count == 0) return;
  at::vec::map([high](Vec x) { return (x - Vec(high)).exp(); }, p.data(), p.data(), count);
  float total = 0.f;
  at = 0;
  for (const Run& r : runs)
    for (int64_t j = r.first; j < r.second; ++j, ++at) {
      total += p[at];
      axpy(p[at], as_float(v + j * v_row, dim_v, scratch.data()), out, dim_v);
    }
  for (int64_t i = 0; i < dim_v; ++i) out[i] /= total;
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& scores, const std::vector<Run>& fixed,
            const std::vector<int64_t>& candidates, int64_t top_k,
            int64_t block_size, float scale, at::Tensor& out) {
  int64_t batch = q.size(0), hq = q.size(1), dim = q.size(2);
  int64_t hkv = k.size(1), kv_len = k.size(2), dim_v = v.size(3);
  int64_t rows = scores.size(1), n = scores.size(2), group = hq / hkv;
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  const float* q_data = q.data_ptr<float>();
  const float* s_data = scores.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, scratch(std::max(dim, dim_v));
    for (int64_t task = begin; task < end; ++task) {
      int64_t b = task / hkv, g = task % hkv;
      const T* kb = k_data + b * k.stride(0) + g * k.stride(1);
      const T* vb = v_data + b * v.stride(0) + g * v.stride(1);
      std::vector<Run> runs;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        int64_t row = rows == hkv ? g : h;  // one selection per group, or per head
        if (h == g * group || rows != hkv)
          runs = key_runs(fixed, select(s_data + (b * rows + row) * n, candidates, top_k),
                          block_size);
        attend<T>(q_data + (b * hq + h) * dim, kb, vb, k.stride(2), v.stride(2), runs, dim,
                  dim_v, scale, p, scratch, o_data + (b * hq + h) * dim_v);
      }
    }
  });
}

}  // namespace

// q (B, Hq, D) float32; k (B, Hkv, L, D) and v (B, Hkv, L, Dv) of one floating dtype, rows
// contiguous; scores (B, Hq or Hkv, n) float32 for the n = L / block_size complete blocks;
// static_keys (S,) int64, sorted, unique, below L; candidates (n,) bool, the blocks the
// query may select. Returns (B, Hq, Dv) float32.
at::Tensor selection_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& scores, const at::Tensor& static_keys,
                            const at::Tensor& candidates, int64_t top_k, int64_t block_size,
                            double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  scores.device().is_cpu() && static_keys.device().is_cpu() &&
                  candidates.device().is_cpu(),
              "selection_decode: every tensor must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "selection_decode: q must be contiguous float32 (B, Hq, D)");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == v.scalar_type(),
              "selection_decode: k and v must be 4-d tensors of one dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "selection_decode: k and v rows must be contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(3) == q.size(2) &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0 && k.size(2) > 0,
              "selection_decode: q (B, Hq, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) disagree");
  TORCH_CHECK(block_size > 0 && top_k >= 0, "selection_decode: block_size > 0, top_k >= 0");
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat && scores.is_contiguous() &&
                  scores.size(0) == q.size(0) &&
                  (scores.size(1) == q.size(1) || scores.size(1) == k.size(1)) &&
                  scores.size(2) == k.size(2) / block_size,
              "selection_decode: scores must be contiguous float32 (B, Hq or Hkv, L / block_size)");
  TORCH_CHECK(static_keys.dim() == 1 && static_keys.scalar_type() == at::kLong &&
                  static_keys.is_contiguous(),
              "selection_decode: static_keys must be a contiguous int64 vector");
  TORCH_CHECK(candidates.dim() == 1 && candidates.scalar_type() == at::kBool &&
                  candidates.is_contiguous() && candidates.size(0) == scores.size(2),
              "selection_decode: candidates must be a contiguous bool vector (n,)");
  std::vector<int64_t> choosable;
  const bool* may = candidates.data_ptr<bool>();
  for (int64_t j = 0; j < candidates.size(0); ++j)
    if (may[j]) choosable.push_back(j);
  std::vector<Run> fixed;
  const int64_t* keys = static_keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < static_keys.numel(); ++i) {
    int64_t j = keys[i];
    TORCH_CHECK(j >= 0 && j < k.size(2) && (i == 0 || j > keys[i - 1]),
                "selection_decode: static_keys must be sorted, unique and within [0, L)");
    if (!fixed.empty() && fixed.back().second == j)
      fixed.back().second = j + 1;
    else
      fixed.emplace_back(j, j + 1);
  }
  auto out = at::empty({q.size(0), q.size(1), v.size(3)}, q.options());
  float sc = float(scale);
  switch (k.scalar_type()) {
    case at::kFloat:
      decode<float>(q, k, v, scores, fixed, choosable, top_k, block_size, sc, out);
      break;
    case at::kBFloat16:
      decode<at::BFloat16>(q, k, v, scores, fixed, choosable, top_k, block_size, sc, out);
      break;
    case at::kHalf:
      decode<at::Half>(q, k, v, scores, fixed, choosable, top_k, block_size, sc, out);
      break;
    default:
      TORCH_CHECK(false, "selection_decode: k and v must be float32, bfloat16 or float16");
  }
  return out;
}

// A learned gate's block scores for one query row per head (`BlockGate.score`):
// q (B, Hq, D) float32; block_keys (B, Hkv, n, m, D) float32, m piece keys per block;
// query_map (G, D, D) float32 with Hq = G * Hkv. Head h's mapped query is q_h M_g / sqrt(D);
// a block's score is the log-sum-exp of its pieces' scores (as torch.logsumexp: NaN, +inf
// and all -inf pieces as there); per head, or the largest over the group's heads (NaN
// wins, as in torch.amax). Blocks from `seen` on are -inf.
// Returns (B, Hq or Hkv, n) float32.
at::Tensor gate_scores(const at::Tensor& q, const at::Tensor& block_keys,
                       const at::Tensor& query_map, bool per_head, int64_t seen) {
  TORCH_CHECK(q.device().is_cpu() && block_keys.device().is_cpu() && query_map.device().is_cpu(),
              "gate_scores: every tensor must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && block_keys.dim() == 5 && query_map.dim() == 3 &&
                  q.scalar_type() == at::kFloat && block_keys.scalar_type() == at::kFloat &&
                  query_map.scalar_type() == at::kFloat && q.is_contiguous() &&
                  block_keys.is_contiguous() && query_map.is_contiguous(),
              "gate_scores: q (B, Hq, D), block_keys (B, Hkv, n, m, D) and query_map (G, D, D) "
              "must be contiguous float32");
  int64_t batch = q.size(0), hq = q.size(1), dim = q.size(2);
  int64_t hkv = block_keys.size(1), n = block_keys.size(2), m = block_keys.size(3);
  int64_t group = query_map.size(0);
  TORCH_CHECK(block_keys.size(0) == batch && block_keys.size(4) == dim && m > 0 &&
                  group * hkv == hq && query_map.size(1) == dim && query_map.size(2) == dim,
              "gate_scores: q (B, Hq, D), block_keys (B, Hkv, n, m, D) and query_map (G, D, D) "
              "disagree (Hq = G * Hkv)");
  TORCH_CHECK(seen >= 0 && seen <= n, "gate_scores: seen must lie in [0, n]");
  auto out = at::empty({batch, per_head ? hq : hkv, n}, q.options());
  const float *q_data = q.data_ptr<float>(), *k_data = block_keys.data_ptr<float>();
  const float* maps = query_map.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(float(dim)), inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mapped(group * dim), pieces(m);
    for (int64_t task = begin; task < end; ++task) {
      int64_t b = task / hkv, g = task % hkv;
      for (int64_t i = 0; i < group; ++i) {  // mapped query of head g * group + i
        const float* qh = q_data + (b * hq + g * group + i) * dim;
        float* row = mapped.data() + i * dim;
        std::fill(row, row + dim, 0.f);
        for (int64_t d = 0; d < dim; ++d) axpy(qh[d] * scale, maps + (i * dim + d) * dim, row, dim);
      }
      const float* keys = k_data + (b * hkv + g) * n * m * dim;
      for (int64_t j = 0; j < n; ++j) {
        float best = -inf;
        for (int64_t i = 0; i < group; ++i) {
          float score = -inf;
          if (j < seen) {
            for (int64_t p = 0; p < m; ++p)
              pieces[p] = dot(mapped.data() + i * dim, keys + (j * m + p) * dim, dim);
            score = m > 1 ? longswap_rows::log_sum_exp(pieces.data(), m) : pieces[0];
          }
          if (per_head)
            o_data[(b * hq + g * group + i) * n + j] = score;
          else
            best = (std::isnan(score) || std::isnan(best)) ? NAN : std::max(best, score);
        }
        if (!per_head) o_data[(b * hkv + g) * n + j] = best;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("selection_decode", &selection_decode,
        "one decoding step of a block-selection pattern (CPU)");
  m.def("gate_scores", &gate_scores, "a learned gate's block scores for one query row (CPU)");
}
