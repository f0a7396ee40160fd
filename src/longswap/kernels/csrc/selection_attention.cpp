// The selected key blocks of a block selection (block_topk, learned_topk, and their unions
// with a window and sinks) on CPU: forward and backward, with no mask stored. q, k, v in
// float32 or bfloat16; scores, softmax, outputs and gradients in float32 (weights rounded to
// bfloat16 for their products with bfloat16 rows).
//
// Query row t of head h sits at absolute position p = offset + t. blocks / chosen
// (B, Hq, Lq, P) name the complete key blocks of `block_size` keys each row selected (the
// chosen places). A selected block shows a row every key except those its static part
// already shows (the window and own block, start(p) <= j, and the sinks, j < sinks): the
// static part is computed by the window kernel, and no key may count twice. A block never
// lies at or after the row's own block, so every key shown is causal.
//
// Work is grouped by key: the rows are cut into chunks, and one task takes one (batch, key
// head, chunk). It sorts the (query head, row) pairs of its chunk by the key block they
// selected, then for each key block multiplies the gathered query rows against the block's
// keys in one BLAS product (rows x block_size) and its values likewise, so every key block
// is read once per chunk, whatever the selection.
//
// Forward: the task's rows start from the static part's output and log-sum-exp and merge
// each block's partial softmax into them (online softmax), so the result is the whole
// pattern's output and log-sum-exp. Backward: from the merged output and log-sum-exp, as
// FlashAttention does across key splits; query gradients stay within the task's rows, key
// and value gradients go to one buffer per slot (a fixed set of tasks), summed in slot order:
// deterministic for a given thread count.
#include "attention_rows.h"

namespace {

using namespace longswap_rows;

// Most (head, row) pairs of one key block multiplied at once.
constexpr int64_t kMaxRows = 512;

struct Selected {
  int64_t batch, heads, kv_heads, groups, q_len, kv_len, dim, dim_v, places, offset;
  int64_t window, own_block, sinks, block_size, n_blocks, chunk, chunks;
  const int64_t* blocks;
  const bool* chosen;

  Selected(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& blocks_, const at::Tensor& chosen_, int64_t window_,
           int64_t own_block_, int64_t sinks_, int64_t block_size_, double scale) {
    const char* what = "selection kernel";
    at::ScalarType dtype = input_dtype(q, what);
    check_rows(q, what, "q", dtype);
    check_rows(k, what, "k", dtype);
    check_rows(v, what, "v", dtype);
    TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                    k.size(2) == v.size(2) && q.size(3) == k.size(3) && k.size(1) >= 1 &&
                    q.size(1) % k.size(1) == 0 && q.size(2) <= k.size(2),
                "selection kernel: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) "
                "with Hq a multiple of Hkv and Lq <= Lk; got q ", q.sizes(), ", k ", k.sizes(),
                ", v ", v.sizes());
    TORCH_CHECK(blocks_.scalar_type() == at::kLong && chosen_.scalar_type() == at::kBool &&
                    blocks_.is_contiguous() && chosen_.is_contiguous() && blocks_.dim() == 4 &&
                    blocks_.sizes() == chosen_.sizes() && blocks_.size(0) == q.size(0) &&
                    blocks_.size(1) == q.size(1) && blocks_.size(2) == q.size(2),
                "selection kernel: blocks (int64) and chosen (bool) must be contiguous "
                "(B, Hq, Lq, P) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                ", P); got ", blocks_.sizes(), " and ", chosen_.sizes());
    TORCH_CHECK(window_ >= 1 && own_block_ >= 1 && sinks_ >= 0 && block_size_ >= 1,
                "selection kernel: window, own_block and block_size must be >= 1 and sinks "
                ">= 0, got ", window_, ", ", own_block_, ", ", block_size_, ", ", sinks_);
    TORCH_CHECK(std::isfinite(scale) && scale > 0,
                "selection kernel: scale must be a finite positive number, got ", scale);
    batch = q.size(0);
    heads = q.size(1);
    kv_heads = k.size(1);
    groups = heads / kv_heads;
    q_len = q.size(2);
    kv_len = k.size(2);
    dim = q.size(3);
    dim_v = v.size(3);
    places = blocks_.size(3);
    offset = kv_len - q_len;
    window = window_;
    own_block = own_block_;
    sinks = sinks_;
    block_size = block_size_;
    n_blocks = kv_len / block_size;
    blocks = blocks_.data_ptr<int64_t>();
    chosen = chosen_.data_ptr<bool>();
    // Enough chunks to keep every thread busy, each large enough that a key block collects
    // many rows (a BLAS-sized product).
    int64_t want = std::max<int64_t>(1, 8 * at::get_num_threads() / (batch * kv_heads));
    chunk = std::max<int64_t>(256, (q_len + want - 1) / want);
    chunks = (q_len + chunk - 1) / chunk;
  }

  int64_t tasks() const { return batch * kv_heads * chunks; }

  // Columns [c0, c1) of key block j that the row at position p sees through the selection.
  void columns(int64_t j, int64_t p, int64_t* c0, int64_t* c1) const {
    int64_t first = j * block_size;
    int64_t start = std::max<int64_t>(0, std::min(p - window + 1, p - p % own_block));
    *c0 = std::clamp<int64_t>(sinks - first, 0, block_size);
    *c1 = std::clamp<int64_t>(start - first, 0, block_size);
  }
};

// The (query head, row) pairs of one task, sorted by the key block they selected.
struct TaskPairs {
  int64_t b, hk, t0, rows;
  std::vector<int64_t> start;  // pairs of key block j: [start[j], start[j + 1])
  std::vector<int32_t> head, row;

  TaskPairs(const Selected& s, int64_t task) : start(s.n_blocks + 1, 0) {
    b = task / (s.kv_heads * s.chunks);
    hk = task / s.chunks % s.kv_heads;
    t0 = task % s.chunks * s.chunk;
    rows = std::min(s.chunk, s.q_len - t0);
    std::vector<int64_t> count(s.n_blocks + 1, 0);
    visit(s, [&](int64_t, int64_t, int64_t j) { ++count[j + 1]; });
    for (int64_t j = 0; j < s.n_blocks; ++j) start[j + 1] = start[j] + count[j + 1];
    head.resize(start[s.n_blocks]);
    row.resize(start[s.n_blocks]);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    visit(s, [&](int64_t h, int64_t t, int64_t j) {
      head[next[j]] = int32_t(h);
      row[next[j]++] = int32_t(t);
    });
  }

  // f(query head, row, key block) for each chosen place of the task's rows.
  template <typename F>
  void visit(const Selected& s, F f) const {
    for (int64_t h = hk * s.groups; h < (hk + 1) * s.groups; ++h) {
      int64_t base = ((b * s.heads + h) * s.q_len + t0) * s.places;
      for (int64_t t = 0; t < rows * s.places; ++t) {
        if (!s.chosen[base + t]) continue;
        int64_t j = s.blocks[base + t];
        TORCH_CHECK(j >= 0 && j < s.n_blocks, "selection kernel: block ", j,
                    " is not a complete key block (0..", s.n_blocks - 1, ")");
        f(h, t0 + t / s.places, j);
      }
    }
  }
};

// Copies the rows of x named by the pairs [lo, hi) into buf (one row of `width` each).
template <typename T>
void gather(const View<T>& x, int64_t width, const TaskPairs& tp, int64_t lo, int64_t hi,
            T* buf) {
  for (int64_t e = lo; e < hi; ++e) {
    std::copy_n(x.row(tp.b, tp.head[e], tp.row[e]), width, buf + (e - lo) * width);
  }
}

// out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) of the whole pattern: the static part's
// out_static / lse_static merged with the selected blocks.
template <typename T>
std::vector<at::Tensor> forward_of(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& blocks,
                                          const at::Tensor& chosen, const at::Tensor& out_static,
                                          const at::Tensor& lse_static, int64_t window,
                                          int64_t own_block, int64_t sinks, int64_t block_size,
                                          double scale) {
  Selected s(q, k, v, blocks, chosen, window, own_block, sinks, block_size, scale);
  TORCH_CHECK(out_static.is_contiguous() && lse_static.is_contiguous() &&
                  out_static.scalar_type() == at::kFloat &&
                  lse_static.scalar_type() == at::kFloat &&
                  out_static.sizes() == at::IntArrayRef({s.batch, s.heads, s.q_len, s.dim_v}) &&
                  lse_static.sizes() == at::IntArrayRef({s.batch, s.heads, s.q_len}),
              "selection kernel: out_static (B, Hq, Lq, Dv) and lse_static (B, Hq, Lq) must be "
              "contiguous float32; got ", out_static.sizes(), " and ", lse_static.sizes());
  auto out = out_static.clone();
  auto lse = lse_static.clone();  // the running maximum until the end
  auto total = at::ones_like(lse);  // the running sum of exponentials, relative to it
  View<T> qv(q), kv(k), vv(v);
  View<float> ov(out);
  float* m_data = lse.data_ptr<float>();
  float* l_data = total.data_ptr<float>();
  float sc = float(scale);
  at::parallel_for(0, s.tasks(), 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> qbuf(kMaxRows * s.dim), weights;
    std::vector<float> sbuf(kMaxRows * s.block_size), pv(kMaxRows * s.dim_v), m_blk(kMaxRows),
        l_blk(kMaxRows);
    for (int64_t task = begin; task < end; ++task) {
      TaskPairs tp(s, task);
      for (int64_t j = 0; j < s.n_blocks; ++j) {
        for (int64_t lo = tp.start[j]; lo < tp.start[j + 1]; lo += kMaxRows) {
          int64_t hi = std::min(tp.start[j + 1], lo + kMaxRows), n = hi - lo;
          gather(qv, s.dim, tp, lo, hi, qbuf.data());
          matmul(false, true, n, s.block_size, s.dim, sc, qbuf.data(), s.dim,
                 kv.row(tp.b, tp.hk, j * s.block_size), kv.sl, 0.f, sbuf.data(), s.block_size);
          for (int64_t e = 0; e < n; ++e) {
            float* r = sbuf.data() + e * s.block_size;
            int64_t c0, c1;
            s.columns(j, s.offset + tp.row[lo + e], &c0, &c1);
            if (c1 <= c0) {  // the static part shows every key of the block to this row
              std::fill(r, r + s.block_size, 0.f);
              m_blk[e] = -INFINITY;
              l_blk[e] = 0.f;
              continue;
            }
            m_blk[e] = max_of(r + c0, c1 - c0, -INFINITY);
            l_blk[e] = exp_in_place(r + c0, c1 - c0, m_blk[e]);
            std::fill(r, r + c0, 0.f);
            std::fill(r + c1, r + s.block_size, 0.f);
          }
          matmul(false, false, n, s.dim_v, s.block_size, 1.f,
                 operand(sbuf.data(), n * s.block_size, weights), s.block_size,
                 vv.row(tp.b, tp.hk, j * s.block_size), vv.sl, 0.f, pv.data(), s.dim_v);
          for (int64_t e = 0; e < n; ++e) {
            if (m_blk[e] == -INFINITY) continue;  // nothing seen (or every score -inf)
            int64_t flat = (tp.b * s.heads + tp.head[lo + e]) * s.q_len + tp.row[lo + e];
            float m_old = m_data[flat], m_new = std::max(m_old, m_blk[e]);
            if (std::isnan(m_blk[e])) m_new = m_blk[e];
            float a = std::exp(m_old - m_new), c = std::exp(m_blk[e] - m_new);
            l_data[flat] = l_data[flat] * a + l_blk[e] * c;
            float* o = ov.row(tp.b, tp.head[lo + e], tp.row[lo + e]);
            const float* x = pv.data() + e * s.dim_v;
            for (int64_t i = 0; i < s.dim_v; ++i) o[i] = o[i] * a + x[i] * c;
            m_data[flat] = m_new;
          }
        }
      }
      for (int64_t h = tp.hk * s.groups; h < (tp.hk + 1) * s.groups; ++h) {
        for (int64_t t = tp.t0; t < tp.t0 + tp.rows; ++t) {
          int64_t flat = (tp.b * s.heads + h) * s.q_len + t;
          float inv = 1.f / l_data[flat];
          float* o = ov.row(tp.b, h, t);
          for (int64_t i = 0; i < s.dim_v; ++i) o[i] *= inv;
          m_data[flat] += std::log(l_data[flat]);
        }
      }
    }
  });
  return {out, lse};
}

// The gradients of selection_backward (below) for inputs of T.
template <typename T>
std::vector<at::Tensor> backward_of(const at::Tensor& grad, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const at::Tensor& blocks, const at::Tensor& chosen,
                                           int64_t window, int64_t own_block, int64_t sinks,
                                           int64_t block_size, double scale) {
  Selected s(q, k, v, blocks, chosen, window, own_block, sinks, block_size, scale);
  for (auto [x, name] : {std::pair{&grad, "grad"}, {&out, "out"}}) {
    check_rows(*x, "selection kernel", name, q.scalar_type());
    TORCH_CHECK(x->sizes() == at::IntArrayRef({s.batch, s.heads, s.q_len, s.dim_v}),
                "selection kernel: ", name, " must be (B, Hq, Lq, Dv), got ", x->sizes());
  }
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads, s.q_len}),
              "selection kernel: lse must be contiguous float32 (B, Hq, Lq), got ", lse.sizes());
  int64_t slots = std::min<int64_t>(s.tasks(), at::get_num_threads());
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::zeros({s.batch, s.heads, s.q_len, s.dim}, f32);
  auto dk_slots = at::zeros({slots, s.batch, s.kv_heads, s.kv_len, s.dim}, f32);
  auto dv_slots = at::zeros({slots, s.batch, s.kv_heads, s.kv_len, s.dim_v}, f32);
  View<T> gv(grad), qv(q), kv(k), vv(v), ov(out);
  View<float> dqv(dq);
  std::vector<View<float>> dk_views, dv_views;
  for (int64_t slot = 0; slot < slots; ++slot) {
    dk_views.emplace_back(dk_slots[slot]);
    dv_views.emplace_back(dv_slots[slot]);
  }
  const float* lse_data = lse.data_ptr<float>();
  float sc = float(scale);
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> qbuf(kMaxRows * s.dim), gbuf(kMaxRows * s.dim_v), p_op, ds_op;
    std::vector<float> pbuf(kMaxRows * s.block_size), dsbuf(kMaxRows * s.block_size),
        dqbuf(kMaxRows * s.dim);
    for (int64_t slot = begin; slot < end; ++slot) {
      const View<float>& dkv = dk_views[slot];
      const View<float>& dvv = dv_views[slot];
      for (int64_t task = slot; task < s.tasks(); task += slots) {
        TaskPairs tp(s, task);
        // dO . O of each row of the task, by (head in group, row in chunk).
        std::vector<float> dots(s.groups * tp.rows);
        for (int64_t g = 0; g < s.groups; ++g) {
          for (int64_t t = 0; t < tp.rows; ++t) {
            int64_t h = tp.hk * s.groups + g;
            dots[g * tp.rows + t] = dot_of(ov.row(tp.b, h, tp.t0 + t), gv.row(tp.b, h, tp.t0 + t),
                                           s.dim_v);
          }
        }
        for (int64_t j = 0; j < s.n_blocks; ++j) {
          const T* k_blk = kv.row(tp.b, tp.hk, j * s.block_size);
          const T* v_blk = vv.row(tp.b, tp.hk, j * s.block_size);
          for (int64_t lo = tp.start[j]; lo < tp.start[j + 1]; lo += kMaxRows) {
            int64_t hi = std::min(tp.start[j + 1], lo + kMaxRows), n = hi - lo;
            gather(qv, s.dim, tp, lo, hi, qbuf.data());
            gather(gv, s.dim_v, tp, lo, hi, gbuf.data());
            matmul(false, true, n, s.block_size, s.dim, sc, qbuf.data(), s.dim, k_blk, kv.sl,
                   0.f, pbuf.data(), s.block_size);
            matmul(false, true, n, s.block_size, s.dim_v, 1.f, gbuf.data(), s.dim_v, v_blk,
                   vv.sl, 0.f, dsbuf.data(), s.block_size);  // dO V^T
            for (int64_t e = 0; e < n; ++e) {
              int64_t h = tp.head[lo + e], t = tp.row[lo + e];
              float* pr = pbuf.data() + e * s.block_size;
              float* dr = dsbuf.data() + e * s.block_size;
              int64_t c0, c1;
              s.columns(j, s.offset + t, &c0, &c1);
              c1 = std::max(c0, c1);
              float l = lse_data[(tp.b * s.heads + h) * s.q_len + t];
              weights_and_grads(pr + c0, dr + c0, c1 - c0, l,
                                dots[(h - tp.hk * s.groups) * tp.rows + t - tp.t0]);
              std::fill(pr, pr + c0, 0.f);
              std::fill(dr, dr + c0, 0.f);
              std::fill(pr + c1, pr + s.block_size, 0.f);
              std::fill(dr + c1, dr + s.block_size, 0.f);
            }
            // dv += p^T dO, dk += scale * ds^T q, dq = scale * ds k
            const T* ds_w = operand(dsbuf.data(), n * s.block_size, ds_op);
            matmul(true, false, s.block_size, s.dim_v, n, 1.f,
                   operand(pbuf.data(), n * s.block_size, p_op), s.block_size, gbuf.data(),
                   s.dim_v, 1.f, dvv.row(tp.b, tp.hk, j * s.block_size), dvv.sl);
            matmul(true, false, s.block_size, s.dim, n, sc, ds_w, s.block_size, qbuf.data(),
                   s.dim, 1.f, dkv.row(tp.b, tp.hk, j * s.block_size), dkv.sl);
            matmul(false, false, n, s.dim, s.block_size, sc, ds_w, s.block_size, k_blk, kv.sl,
                   0.f, dqbuf.data(), s.dim);
            for (int64_t e = 0; e < n; ++e) {
              float* dst = dqv.row(tp.b, tp.head[lo + e], tp.row[lo + e]);
              const float* src = dqbuf.data() + e * s.dim;
              for (int64_t i = 0; i < s.dim; ++i) dst[i] += src[i];
            }
          }
        }
      }
    }
  });
  return {dq, dk_slots.sum(0), dv_slots.sum(0)};
}

}  // namespace

// out (B, Hq, Lq, Dv) and lse (B, Hq, Lq), float32, of the whole pattern: the static part's
// out_static / lse_static (float32) merged with the selected blocks; q, k, v float32 or
// bfloat16.
std::vector<at::Tensor> selection_forward(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& blocks,
                                          const at::Tensor& chosen, const at::Tensor& out_static,
                                          const at::Tensor& lse_static, int64_t window,
                                          int64_t own_block, int64_t sinks, int64_t block_size,
                                          double scale) {
  auto f = input_dtype(q, "selection kernel") == at::kBFloat16 ? forward_of<at::BFloat16>
                                                               : forward_of<float>;
  return f(q, k, v, blocks, chosen, out_static, lse_static, window, own_block, sinks,
           block_size, scale);
}

// The selected blocks' share of the gradients, float32: dq (B, Hq, Lq, D), dk
// (B, Hkv, Lk, D) and dv (B, Hkv, Lk, Dv), from the whole pattern's out (q's dtype) and lse
// (selection_forward's).
std::vector<at::Tensor> selection_backward(const at::Tensor& grad, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const at::Tensor& blocks, const at::Tensor& chosen,
                                           int64_t window, int64_t own_block, int64_t sinks,
                                           int64_t block_size, double scale) {
  auto f = input_dtype(q, "selection kernel") == at::kBFloat16 ? backward_of<at::BFloat16>
                                                               : backward_of<float>;
  return f(grad, q, k, v, out, lse, blocks, chosen, window, own_block, sinks, block_size,
           scale);
}

// The `places` best blocks of each row of scores (rows..., Lq, n) among those valid (Lq, n)
// marks for it, by top_places's rule (patterns/block_topk.py; rank_key here): best first,
// NaN above every number, ties to the more recent block, -inf and blocks not valid never
// chosen (they fill the last places). Returns blocks (rows..., Lq, places) int64, distinct
// within a row, and chosen (bool): the same tensors as top_places.
std::vector<at::Tensor> top_blocks(const at::Tensor& scores, const at::Tensor& valid,
                                   int64_t places) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.dim() >= 2 &&
                  valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.dim() == 2 &&
                  scores.size(-2) == valid.size(0) && scores.size(-1) == valid.size(1) &&
                  places >= 0,
              "top_blocks: scores (..., Lq, n) contiguous float32 and valid (Lq, n) contiguous "
              "bool, places >= 0; got ", scores.sizes(), ", ", valid.sizes(), ", ", places);
  TORCH_CHECK(places <= valid.size(1), "top_blocks: places (", places, ") exceed the blocks (",
              valid.size(1), ")");
  int64_t q_len = valid.size(0), n = valid.size(1), rows = scores.numel() / std::max<int64_t>(n, 1);
  auto shape = scores.sizes().vec();
  shape.back() = places;
  auto blocks = at::empty(shape, scores.options().dtype(at::kLong));
  auto chosen = at::empty(shape, scores.options().dtype(at::kBool));
  const float* sc = scores.data_ptr<float>();
  const bool* ok = valid.data_ptr<bool>();
  int64_t* bl = blocks.data_ptr<int64_t>();
  bool* ch = chosen.data_ptr<bool>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(n);
    for (int64_t r = begin; r < end; ++r) {
      const float* s = sc + r * n;
      const bool* v = ok + (r % q_len) * n;
      for (int64_t j = 0; j < n; ++j)
        keys[j] = rank_key(v[j] ? rank_order(s[j]) : kNotCandidate, j);
      auto first = keys.begin(), nth = first + places;
      if (places < n) std::nth_element(first, nth, keys.end(), std::greater<int64_t>());
      std::sort(first, nth, std::greater<int64_t>());
      for (int64_t i = 0; i < places; ++i) {
        bl[r * places + i] = ranked_block(keys[i]);
        ch[r * places + i] = keys[i] >= kFirstChosen;
      }
    }
  });
  return {blocks, chosen};
}

// A learned gate's block scores for the rows of a prompt (selectors/gate.py, without
// gradients): mapped (B, Hq, Lq, D) holds each head's mapped queries, keys (B, Hkv, n, m, D)
// each block's m piece summaries. A block's score for a row is the log-sum-exp of the row's
// products with its pieces (as torch.logsumexp: NaN, +inf and all -inf pieces as there);
// per KV group (per_head false) the max over the group's heads (NaN wins, as torch.amax).
// Rows are taken in chunks of 64; a chunk scores the blocks before its last row's own block
// (`offset`: the position of row 0; blocks of `block_size` keys), the others are -inf.
// Returns (B, Hq or Hkv, Lq, n) float32.
at::Tensor gate_prompt_scores(const at::Tensor& mapped, const at::Tensor& keys, bool per_head,
                              int64_t offset, int64_t block_size) {
  TORCH_CHECK(mapped.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  mapped.is_contiguous() && keys.is_contiguous() && mapped.dim() == 4 &&
                  keys.dim() == 5 && mapped.size(0) == keys.size(0) &&
                  mapped.size(3) == keys.size(4) && keys.size(1) >= 1 &&
                  mapped.size(1) % keys.size(1) == 0 && offset >= 0 && block_size >= 1,
              "gate_prompt_scores: mapped (B, Hq, Lq, D) and keys (B, Hkv, n, m, D), contiguous "
              "float32, offset >= 0, block_size >= 1; got ", mapped.sizes(), ", ", keys.sizes());
  int64_t batch = mapped.size(0), hq = mapped.size(1), q_len = mapped.size(2);
  int64_t dim = mapped.size(3), hkv = keys.size(1), n = keys.size(2), m = keys.size(3);
  int64_t groups = hq / hkv, heads = per_head ? hq : hkv, rows = 64;
  int64_t chunks = (q_len + rows - 1) / rows;
  auto out = at::full({batch, heads, q_len, n}, -INFINITY, mapped.options());
  const float* mp = mapped.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<float> s(rows * n * m), piece(m);
    for (int64_t task = begin; task < end; ++task) {
      int64_t b = task / (hkv * chunks), hk = task / chunks % hkv;
      int64_t t0 = task % chunks * rows, r_n = std::min(rows, q_len - t0);
      int64_t seen = std::min(n, (offset + t0 + r_n - 1) / block_size), cols = seen * m;
      if (seen == 0) continue;
      const float* k_head = kp + (b * hkv + hk) * n * m * dim;
      for (int64_t g = 0; g < groups; ++g) {
        int64_t h = hk * groups + g;
        matmul(false, true, r_n, cols, dim, 1.f, mp + ((b * hq + h) * q_len + t0) * dim, dim,
               k_head, dim, 0.f, s.data(), cols);
        for (int64_t r = 0; r < r_n; ++r) {
          float* row = s.data() + r * cols;
          float* dst = op + ((b * heads + (per_head ? h : hk)) * q_len + t0 + r) * n;
          // One shift for the row (vectorized): its largest finite piece, so that a NaN or
          // infinite piece changes its own block's score only.
          float top = finite_max(row, cols), shift = top == -INFINITY ? 0.f : top;
          exp_in_place(row, cols, shift);
          for (int64_t j = 0; j < seen; ++j) {
            float sum = 0.f;
            for (int64_t i = 0; i < m; ++i) sum += row[j * m + i];
            float score = shift + std::log(sum);
            if (sum == 0.f) {  // underflow (or every piece -inf): the block's own shift, exact
              const float* raw = mp + ((b * hq + h) * q_len + t0 + r) * dim;
              for (int64_t i = 0; i < m; ++i) {
                const float* key = k_head + (j * m + i) * dim;
                float dot = 0.f;
                for (int64_t d = 0; d < dim; ++d) dot += raw[d] * key[d];
                piece[i] = dot;
              }
              score = log_sum_exp(piece.data(), m);
            }
            if (g == 0 || per_head || std::isnan(score) || score > dst[j]) dst[j] = score;
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gate_prompt_scores", &gate_prompt_scores, "a learned gate's block scores (CPU)");
  m.def("top_blocks", &top_blocks, "the best valid blocks of each row of scores (CPU)");
  m.def("forward", &selection_forward, "selected key blocks, forward (CPU)");
  m.def("backward", &selection_backward, "selected key blocks, backward (CPU)");
}
