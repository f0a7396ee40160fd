// Sliding-window attention (with optional attention sinks) on CPU: q, k, v in float32 or
// bfloat16; scores, softmax, outputs and gradients in float32 (the weights are rounded to
// bfloat16 for their products with bfloat16 rows, as FlashAttention does).
//
// Query row t sits at absolute position p = offset + t and sees the keys j with
// start(p) <= j <= p, plus the keys j < sinks, where start(p) = min(p - window + 1,
// p - p % own_block): the window, united with the query's aligned block of own_block keys
// (the own block of a block selection; own_block = 1 adds nothing). A block of `block` query rows needs one
// contiguous key range [lo, hi) and the sinks before it, [0, ns): its scores are one
// (rows x (ns + hi - lo)) matrix, computed by BLAS and masked by two intervals per row, so
// no pair beyond the block's own corner triangles is ever computed and no mask is stored.
//
// Forward: one task per (batch, query head, query block). Backward: key gradients of
// neighbouring query blocks overlap, so the blocks of each head are cut into segments
// whose key ranges overlap only their neighbours'; even segments run in parallel first,
// then odd ones. Sink-key gradients go to one private slot per segment, summed by the
// caller. Key gradients are per query head (B, Hq, Lk, D): the caller sums grouped heads.
//
// Every entry point checks its arguments (TORCH_CHECK) before reading memory. Floating
// point follows IEEE (no -ffast-math): a NaN among the scores a query row sees makes that
// row's output and log-sum-exp NaN, as in the dense oracle. The exponentials are
// vectorized through ATen's Vectorized<float> (SLEEF), which keeps NaN and infinities.
#include "attention_rows.h"

namespace {

using namespace longswap_rows;

// Largest query block the caller may ask for: its score buffer is block x (sinks + window
// + block) floats per thread.
constexpr int64_t kMaxBlock = 4096;

struct Geometry {
  int64_t batch, heads, groups, q_len, kv_len, dim, dim_v, window, own_block, reach, sinks,
      offset, block;
  // Checks q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) and the arguments.
  Geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_,
           int64_t sinks_, double scale, int64_t block_, int64_t own_block_) {
    at::ScalarType dtype = input_dtype(q, "window kernel");
    check_rows(q, "window kernel", "q", dtype);
    check_rows(k, "window kernel", "k", dtype);
    check_rows(v, "window kernel", "v", dtype);
    TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0),
                "window kernel: q, k and v must share the batch size, got q ", q.sizes(),
                ", k ", k.sizes(), ", v ", v.sizes());
    TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2),
                "window kernel: k and v must agree on (Hkv, Lk), got k ", k.sizes(), ", v ",
                v.sizes());
    TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                "window kernel: query heads (", q.size(1), ") must be a multiple of key/value "
                "heads (", k.size(1), ")");
    TORCH_CHECK(q.size(3) == k.size(3), "window kernel: q and k must share the head dim D, "
                "got q ", q.sizes(), ", k ", k.sizes());
    TORCH_CHECK(q.size(2) <= k.size(2), "window kernel: Lq (", q.size(2), ") must not exceed "
                "Lk (", k.size(2), "): query i sits at key position Lk - Lq + i");
    TORCH_CHECK(window_ >= 1, "window kernel: window must be >= 1, got ", window_);
    TORCH_CHECK(own_block_ >= 1, "window kernel: own_block must be >= 1 (1: none), got ",
                own_block_);
    TORCH_CHECK(sinks_ >= 0 && sinks_ <= k.size(2), "window kernel: sinks must lie in [0, Lk = ",
                k.size(2), "], got ", sinks_, " (clip it to the key length)");
    TORCH_CHECK(std::isfinite(scale) && scale > 0, "window kernel: scale must be a finite "
                "positive number, got ", scale);
    TORCH_CHECK(block_ >= 1 && block_ <= kMaxBlock, "window kernel: block must lie in [1, ",
                kMaxBlock, "], got ", block_);
    batch = q.size(0);
    heads = q.size(1);
    groups = q.size(1) / k.size(1);
    q_len = q.size(2);
    kv_len = k.size(2);
    dim = q.size(3);
    dim_v = v.size(3);
    window = std::min(window_, std::max<int64_t>(kv_len, 1));  // wider sees the same keys
    own_block = std::min(own_block_, std::max<int64_t>(kv_len, 1));
    reach = std::max(window, own_block);  // a row sees at most reach - 1 keys before itself
    sinks = sinks_;
    offset = kv_len - q_len;
    block = block_;
  }
  int64_t blocks() const { return (q_len + block - 1) / block; }
  // Most score columns a block needs: its sinks, its window and its own rows.
  int64_t columns() const { return std::min(sinks, kv_len) + std::min(reach - 1, kv_len) + block; }
  // First key of the window and own block of the query at absolute position p.
  int64_t start(int64_t p) const { return std::max<int64_t>(0, std::min(p - window + 1, p - p % own_block)); }
};

// The keys of the query block starting at row t0: window range [lo, hi), sinks [0, ns).
struct BlockKeys {
  int64_t t0, rows, lo, hi, ns;
  BlockKeys(const Geometry& g, int64_t index) {
    t0 = index * g.block;
    rows = std::min(g.block, g.q_len - t0);
    lo = g.start(g.offset + t0);
    hi = g.offset + t0 + rows;
    ns = std::min(g.sinks, lo);
  }
  int64_t width() const { return ns + hi - lo; }
  // Visible columns of block row r: [0, e) and [s, f) (sink columns come first).
  void intervals(const Geometry& g, int64_t r, int64_t* e, int64_t* s, int64_t* f) const {
    int64_t p = g.offset + t0 + r;
    int64_t a = std::max(lo, g.start(p));
    int64_t sink_end = std::min(std::max(g.sinks, lo), a);
    *e = ns + sink_end - lo;
    *s = ns + a - lo;
    *f = ns + p + 1 - lo;
  }
};

// s (rows x width) = alpha * a x^T over the block's keys: a (rows x inner) is the query
// block against keys, or the output gradient against values.
template <typename T>
void against_keys(const BlockKeys& bk, int64_t inner, float alpha, const T* a, int64_t lda,
                  const View<T>& x, int64_t b, int64_t hk, float* s) {
  int64_t w = bk.width();
  matmul(false, true, bk.rows, bk.ns, inner, alpha, a, lda, x.row(b, hk, 0), x.sl, 0.f, s, w);
  matmul(false, true, bk.rows, bk.hi - bk.lo, inner, alpha, a, lda, x.row(b, hk, bk.lo), x.sl,
         0.f, s + bk.ns, w);
}

// c (rows x n) = alpha * p (rows x width) @ x over the block's keys (x: values or keys).
template <typename T>
void times_keys(const BlockKeys& bk, int64_t n, float alpha, const T* p, const View<T>& x,
                int64_t b, int64_t hk, float* c, int64_t ldc) {
  int64_t w = bk.width();
  matmul(false, false, bk.rows, n, bk.ns, alpha, p, w, x.row(b, hk, 0), x.sl, 0.f, c, ldc);
  matmul(false, false, bk.rows, n, bk.hi - bk.lo, alpha, p + bk.ns, w, x.row(b, hk, bk.lo),
         x.sl, bk.ns ? 1.f : 0.f, c, ldc);
}

// Key-side gradients: alpha * weights^T a (weights: rows x width, a: rows x n) added to the
// sink keys' rows in `sinks` (ns x n) and to the window's rows lo.. of `keys`.
template <typename T>
void add_to_keys(const BlockKeys& bk, int64_t n, float alpha, const T* weights, const T* a,
                 int64_t lda, float* sinks, const View<float>& keys, int64_t b, int64_t h) {
  int64_t w = bk.width();
  matmul(true, false, bk.ns, n, bk.rows, alpha, weights, w, a, lda, 1.f, sinks, n);
  matmul(true, false, bk.hi - bk.lo, n, bk.rows, alpha, weights + bk.ns, w, a, lda, 1.f,
         keys.row(b, h, bk.lo), keys.sl);
}

// out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) of q (B, Hq, Lq, D) over k, v (B, Hkv, Lk, *).
template <typename T>
std::vector<at::Tensor> forward_of(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, int64_t window, int64_t sinks,
                                   double scale, int64_t block, int64_t own_block) {
  Geometry g(q, k, v, window, sinks, scale, block, own_block);
  int64_t batch = g.batch, hq = g.heads;
  auto out = at::empty({batch, hq, g.q_len, g.dim_v}, q.options().dtype(at::kFloat));
  auto lse = at::empty({batch, hq, g.q_len}, q.options().dtype(at::kFloat));
  View<T> qv(q), kv(k), vv(v);
  View<float> ov(out);
  float* lse_data = lse.data_ptr<float>();
  int64_t n_blocks = g.blocks();
  at::parallel_for(0, batch * hq * n_blocks, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<float> s(g.block * g.columns());
    std::vector<T> weights;
    for (int64_t task = begin; task < end; ++task) {
      int64_t b = task / (hq * n_blocks), h = task / n_blocks % hq;
      BlockKeys bk(g, task % n_blocks);
      int64_t w = bk.width(), hk = h / g.groups;
      against_keys(bk, g.dim, float(scale), qv.row(b, h, bk.t0), qv.sl, kv, b, hk, s.data());
      float* lse_row = lse_data + (b * hq + h) * g.q_len + bk.t0;
      for (int64_t r = 0; r < bk.rows; ++r) {
        int64_t e, a, f;
        bk.intervals(g, r, &e, &a, &f);
        float* row = s.data() + r * w;
        float m = max_of(row + a, f - a, max_of(row, e, row[f - 1]));
        float total = exp_in_place(row, e, m) + exp_in_place(row + a, f - a, m);
        std::fill(row + e, row + a, 0.f);
        std::fill(row + f, row + w, 0.f);
        float inv = 1.f / total;
        for (int64_t j = 0; j < f; ++j) row[j] *= inv;
        lse_row[r] = m + std::log(total);
      }
      times_keys(bk, g.dim_v, 1.f, operand(s.data(), bk.rows * w, weights), vv, b, hk,
                 ov.row(b, h, bk.t0), ov.sl);
    }
  });
  return {out, lse};
}

// The gradients of window_backward (below) for inputs of T.
template <typename T>
std::vector<at::Tensor> backward_of(const at::Tensor& grad, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const at::Tensor& lse,
                                    int64_t window, int64_t sinks, double scale,
                                    int64_t block, int64_t own_block) {
  Geometry g(q, k, v, window, sinks, scale, block, own_block);
  int64_t batch = g.batch, hq = g.heads;
  for (auto [x, name] : {std::pair{&grad, "grad"}, {&out, "out"}}) {
    check_rows(*x, "window kernel", name, q.scalar_type());
    TORCH_CHECK(x->sizes() == at::IntArrayRef({batch, hq, g.q_len, g.dim_v}),
                "window kernel: ", name, " must be (B, Hq, Lq, Dv) = (", batch, ", ", hq, ", ",
                g.q_len, ", ", g.dim_v, "), got ", x->sizes());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({batch, hq, g.q_len}),
              "window kernel: lse must be a contiguous float32 CPU tensor (B, Hq, Lq) = (", batch,
              ", ", hq, ", ", g.q_len, "), got ", lse.scalar_type(), " ", lse.sizes());
  int64_t n_blocks = g.blocks();
  // A segment's keys reach reach - 1 before its first row: segments of at least that many
  // rows overlap only their neighbours. Aim for several segments per thread.
  int64_t min_blocks = (g.reach - 1 + block - 1) / block + 1;
  int64_t want = std::max<int64_t>(1, 4 * at::get_num_threads() / std::max<int64_t>(1, batch * hq));
  int64_t per_segment = std::max(min_blocks, (n_blocks + 2 * want - 1) / (2 * want));
  int64_t segments = (n_blocks + per_segment - 1) / per_segment;
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::empty({batch, hq, g.q_len, g.dim}, f32);
  auto dk = at::zeros({batch, hq, g.kv_len, g.dim}, f32);
  auto dv = at::zeros({batch, hq, g.kv_len, g.dim_v}, f32);
  auto dk_sink = at::zeros({batch, hq, segments, sinks, g.dim}, f32);
  auto dv_sink = at::zeros({batch, hq, segments, sinks, g.dim_v}, f32);
  View<T> gv(grad), qv(q), kv(k), vv(v), ov(out);
  View<float> dqv(dq), dkv(dk), dvv(dv);
  const float* lse_data = lse.data_ptr<float>();
  float* dk_sink_data = dk_sink.data_ptr<float>();
  float* dv_sink_data = dv_sink.data_ptr<float>();
  float sc = float(scale);
  int64_t per_parity = (segments + 1) / 2;
  for (int64_t parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, batch * hq * per_parity, 1, [&](int64_t begin, int64_t end) {
      SequentialBlas sequential;
      std::vector<float> p(g.block * g.columns()), ds(g.block * g.columns());
      std::vector<T> p_op, ds_op;
      for (int64_t task = begin; task < end; ++task) {
        int64_t b = task / (hq * per_parity), h = task / per_parity % hq;
        int64_t segment = 2 * (task % per_parity) + parity;
        if (segment >= segments) continue;
        int64_t hk = h / g.groups;
        int64_t slot = ((b * hq + h) * segments + segment) * sinks;
        int64_t last = std::min(n_blocks, (segment + 1) * per_segment);
        for (int64_t index = segment * per_segment; index < last; ++index) {
          BlockKeys bk(g, index);
          int64_t w = bk.width();
          const T* q_blk = qv.row(b, h, bk.t0);
          const T* do_blk = gv.row(b, h, bk.t0);
          against_keys(bk, g.dim, sc, q_blk, qv.sl, kv, b, hk, p.data());
          against_keys(bk, g.dim_v, 1.f, do_blk, gv.sl, vv, b, hk, ds.data());  // dO V^T
          const float* lse_row = lse_data + (b * hq + h) * g.q_len + bk.t0;
          for (int64_t r = 0; r < bk.rows; ++r) {
            float dot = dot_of(ov.row(b, h, bk.t0 + r), gv.row(b, h, bk.t0 + r), g.dim_v);
            int64_t e, a, f;
            bk.intervals(g, r, &e, &a, &f);
            float* pr = p.data() + r * w;
            float* dr = ds.data() + r * w;
            float l = lse_row[r];
            weights_and_grads(pr, dr, e, l, dot);
            weights_and_grads(pr + a, dr + a, f - a, l, dot);
            std::fill(pr + e, pr + a, 0.f);
            std::fill(dr + e, dr + a, 0.f);
            std::fill(pr + f, pr + w, 0.f);
            std::fill(dr + f, dr + w, 0.f);
          }
          const T* ds_w = operand(ds.data(), bk.rows * w, ds_op);
          times_keys(bk, g.dim, sc, ds_w, kv, b, hk, dqv.row(b, h, bk.t0), dqv.sl);
          // dk += scale * ds^T q, dv += p^T dO: sinks into this segment's slot
          add_to_keys(bk, g.dim, sc, ds_w, q_blk, qv.sl, dk_sink_data + slot * g.dim, dkv, b, h);
          add_to_keys(bk, g.dim_v, 1.f, operand(p.data(), bk.rows * w, p_op), do_blk, gv.sl,
                      dv_sink_data + slot * g.dim_v, dvv, b, h);
        }
      }
    });
  }
  return {dq, dk, dv, dk_sink, dv_sink};
}

}  // namespace

// out (B, Hq, Lq, Dv) float32 and lse (B, Hq, Lq) of q (B, Hq, Lq, D) over k, v
// (B, Hkv, Lk, *), all three float32 or all bfloat16.
std::vector<at::Tensor> window_forward(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, int64_t window, int64_t sinks,
                                       double scale, int64_t block, int64_t own_block) {
  if (input_dtype(q, "window kernel") == at::kBFloat16)
    return forward_of<at::BFloat16>(q, k, v, window, sinks, scale, block, own_block);
  return forward_of<float>(q, k, v, window, sinks, scale, block, own_block);
}

// dq (B, Hq, Lq, D), dk and dv per query head (B, Hq, Lk, *), and the sink keys' gradients
// per segment (B, Hq, segments, sinks, *), all float32: the caller adds the sinks' to the
// first keys. grad and out share q's dtype; lse is float32.
std::vector<at::Tensor> window_backward(const at::Tensor& grad, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& out, const at::Tensor& lse,
                                        int64_t window, int64_t sinks, double scale,
                                        int64_t block, int64_t own_block) {
  if (input_dtype(q, "window kernel") == at::kBFloat16)
    return backward_of<at::BFloat16>(grad, q, k, v, out, lse, window, sinks, scale, block,
                                     own_block);
  return backward_of<float>(grad, q, k, v, out, lse, window, sinks, scale, block, own_block);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &window_forward, "sliding-window attention forward (CPU)");
  m.def("backward", &window_backward, "sliding-window attention backward (CPU)");
}
