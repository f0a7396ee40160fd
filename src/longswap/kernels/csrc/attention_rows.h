// Helpers shared by longswap's CPU attention kernels: BLAS products over rows of
// (B, H, L, D) float32 or bfloat16 tensors (bfloat16 products accumulate in float32), vectorized softmax pieces that keep NaN and infinities (IEEE,
// no -ffast-math; exponentials through ATen's Vectorized<float>, i.e. SLEEF), and the rank
// of a key block by its score.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

// BLAS's single-precision matrix product (column-major), exported by torch's MKL.
extern "C" void sgemm_(const char* trans_a, const char* trans_b, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
// MKL's bfloat16 product with float32 accumulation and output (same arguments as sgemm_,
// bfloat16 as its 16 bits); weak: absent where torch's BLAS is not MKL.
extern "C" void gemm_bf16bf16f32_(const char* trans_a, const char* trans_b, const int* m,
                                  const int* n, const int* k, const float* alpha,
                                  const uint16_t* a, const int* lda, const uint16_t* b,
                                  const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
// MKL's thread count for the calling thread; weak: absent where torch's BLAS is not MKL.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace longswap_rows {

// Row-major C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C.
inline void matmul(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
            const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;  // callers never rely on beta alone
  // Row-major C is column-major C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mm = int(n), nn = int(m), kk = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
  sgemm_(&tb, &ta, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// The rows x cols matrix x (row stride ld) as dense float32 rows in `buf`.
inline const float* widened(const at::BFloat16* x, int64_t rows, int64_t cols, int64_t ld,
                            std::vector<float>& buf) {
  buf.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(x + r * ld, buf.data() + r * cols, cols);
  return buf.data();
}

// The same product of bfloat16 matrices, accumulated in float32 into float32 C: MKL's
// bfloat16 kernel (AVX512-BF16 or AMX where the CPU has them), else both widened to float32.
inline void matmul(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
            const at::BFloat16* a, int64_t lda, const at::BFloat16* b, int64_t ldb, float beta,
            float* c, int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  if (!gemm_bf16bf16f32_) {
    thread_local std::vector<float> wa, wb;
    int64_t ra = trans_a ? k : m, rb = trans_b ? n : k;
    const float* fa = widened(a, ra, trans_a ? m : k, lda, wa);
    const float* fb = widened(b, rb, trans_b ? k : n, ldb, wb);
    matmul(trans_a, trans_b, m, n, k, alpha, fa, trans_a ? m : k, fb, trans_b ? k : n, beta, c,
           ldc);
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mm = int(n), nn = int(m), kk = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
  gemm_bf16bf16f32_(&tb, &ta, &mm, &nn, &kk, &alpha, reinterpret_cast<const uint16_t*>(b), &la,
                    reinterpret_cast<const uint16_t*>(a), &lb, &beta, c, &lc);
}

// x[0, n) (float32 weights or gradients) as an operand of a product with T rows: x itself
// for float32, else rounded to bfloat16 in `buf` (as FlashAttention rounds its weights).
template <typename T>
const T* operand(const float* x, int64_t n, std::vector<T>& buf) {
  buf.resize(n);
  at::vec::convert(x, buf.data(), n);
  return buf.data();
}
template <>
inline const float* operand<float>(const float* x, int64_t, std::vector<float>&) {
  return x;
}

// sum_i a[i] b[i] over [0, n) in float32.
template <typename T>
float dot_of(const T* a, const T* b, int64_t n) {
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += float(a[i]) * float(b[i]);
  return total;
}

// While alive, MKL calls made by this thread stay on this thread: each task is already one
// thread's share of the work.
struct SequentialBlas {
  int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// A (B, H, L, D) tensor of T read through its strides; rows must be contiguous. A single
// row's stride along L is never followed: BLAS gets D instead, whatever torch recorded.
template <typename T = float>
struct View {
  T* data;
  int64_t sb, sh, sl;
  explicit View(const at::Tensor& x)
      : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)),
        sl(x.size(2) > 1 ? x.stride(2) : std::max<int64_t>(x.size(3), 1)) {}
  T* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

using Vec = at::vec::Vectorized<float>;

// A (B, H, L, D) CPU tensor of `dtype` (float32 or bfloat16) whose rows BLAS can read:
// unit stride along D, a row stride of at least D (rows do not overlap), every stride and
// size within BLAS's int.
inline void check_rows(const at::Tensor& x, const char* kernel, const char* name,
                       at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() == 4,
              kernel, ": ", name, " must be a 4-D ",
              dtype == at::kFloat ? "float32" : "bfloat16", " CPU tensor (B, H, L, D), got ",
              x.scalar_type(), " on ", x.device(), " with shape ", x.sizes());
  bool rows = x.size(2) > 1;
  TORCH_CHECK(x.numel() == 0 || (x.stride(3) == 1 && (!rows || x.stride(2) >= x.size(3))),
              kernel, ": ", name, " must hold each row contiguously and apart from the "
              "next (stride 1 along D, stride >= D along L), got shape ", x.sizes(),
              " with strides ", x.strides(), "; pass x.contiguous()");
  TORCH_CHECK(x.size(3) <= INT_MAX && (!rows || x.stride(2) <= INT_MAX), kernel, ": ", name, " has rows too long for BLAS (D ", x.size(3), ", row stride ", x.stride(2),
              "; at most ", INT_MAX, ")");
}

// The element type of q: float32 or bfloat16, the kernels' two input dtypes.
inline at::ScalarType input_dtype(const at::Tensor& q, const char* kernel) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, kernel,
              ": q, k and v must be float32 or bfloat16, got ", q.scalar_type());
  return q.scalar_type();
}

// Largest of m and x[0, n); NaN when one is NaN (as torch.amax), so that a caller who skips
// a row whose largest score is -inf never skips a NaN.
inline float max_of(const float* x, int64_t n, float m) {
  Vec best(m);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) best = at::vec::maximum(best, Vec::loadu(x + j));
  m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; j < n; ++j) m = std::isnan(x[j]) || x[j] > m ? x[j] : m;
  return m;
}

// x[j] = exp(x[j] - shift) over [0, n); returns their sum.
inline float exp_in_place(float* x, int64_t n, float shift) {
  const Vec s(shift);
  Vec sum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(x + j) - s).exp();
    e.store(x + j);
    sum = sum + e;
  }
  float total = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum);
  for (; j < n; ++j) total += (x[j] = std::exp(x[j] - shift));
  return total;
}

// Largest finite value of x[0, n); -inf when none is finite.
inline float finite_max(const float* x, int64_t n) {
  const Vec lowest(-INFINITY), inf(INFINITY);
  Vec best(lowest);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j);
    best = at::vec::maximum(best, Vec::blendv(lowest, v, v.abs() < inf));
  }
  float m = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; j < n; ++j)
    if (std::isfinite(x[j])) m = std::max(m, x[j]);
  return m;
}

// log(sum(exp(x[0, n)))) as torch.logsumexp gives it: NaN when one is NaN, +inf when one is
// +inf (and none NaN), -inf when all are -inf. Leaves exp(x - shift) in x.
inline float log_sum_exp(float* x, int64_t n) {
  float top = finite_max(x, n), shift = top == -INFINITY ? 0.f : top;
  return shift + std::log(exp_in_place(x, n, shift));
}

// The rank of key block `block` scored `score`, as top_places (patterns/block_topk.py)
// ranks blocks: larger keys rank first, one integer compare. A NaN ranks above every
// number, ties (-0 with +0, NaN with NaN) go to the more recent block; -inf ranks below
// every number and a block the query may not select (kNotCandidate) below -inf: a block is
// chosen only when its key is at least kFirstChosen.
constexpr int64_t kNanOrder = INT32_MAX, kNotCandidate = INT32_MIN;
constexpr int64_t kFirstChosen = (int64_t(-0x7f800000) + 1) * (int64_t(1) << 32);

inline int64_t rank_order(float score) {
  if (std::isnan(score)) return kNanOrder;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  int64_t magnitude = bits & 0x7fffffffu;
  return (bits >> 31) ? -magnitude : magnitude;
}

inline int64_t rank_key(int64_t order, int64_t block) {
  return order * (int64_t(1) << 32) + block;
}

inline int64_t ranked_block(int64_t key) { return key & 0xffffffff; }

// Softmax weights and their score gradients over [0, n): p[j] = exp(p[j] - lse) and
// d[j] = p[j] (d[j] - dot), where p holds scores and d the products dO . v_j on entry.
inline void weights_and_grads(float* p, float* d, int64_t n, float lse, float dot) {
  const Vec l(lse), o(dot);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = (Vec::loadu(p + j) - l).exp();
    e.store(p + j);
    (e * (Vec::loadu(d + j) - o)).store(d + j);
  }
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - lse);
    d[j] = p[j] * (d[j] - dot);
  }
}

}  // namespace longswap_rows
