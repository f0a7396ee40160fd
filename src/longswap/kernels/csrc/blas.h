// BLAS for longswap's CPU kernels: torch's MKL single-precision matrix product, row-major.
#pragma once

#include <cstdint>

// BLAS's single-precision matrix product (column-major), exported by torch's MKL.
extern "C" void sgemm_(const char* trans_a, const char* trans_b, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
// MKL's thread count for the calling thread; weak: absent where torch's BLAS is not MKL.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace longswap_blas {

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

// While alive, MKL calls made by this thread stay on this thread: each task is already one
// thread's share of the work.
struct SequentialBlas {
  int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

}  // namespace longswap_blas
