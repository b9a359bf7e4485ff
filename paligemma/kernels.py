"""A small C++ kernel for the decode step: bf16 matrix times a few vectors, at memory speed.

At batch 1, a decode step is a chain of matrix-vector products whose cost is streaming the weights.
torch's bf16 `F.linear` streams a row-major weight at ~9-13 GB/s on the benchmark CPU (AMD EPYC,
AVX-512) against ~17-23 GB/s that a plain sum reaches; this kernel reads each weight row once for all
(at most 8) input rows, with AVX512-BF16 dot products (`vdpbf16ps`, fp32 accumulation) and the next
block of rows prefetched, and reaches 12-20 GB/s on the same weights (BENCHMARKS.md).

It is compiled on first use with torch's C++ extension loader (about 40 s, cached under
~/.cache/torch_extensions) and used only where it applies: bf16, CPU with AVX512-BF16, <= 8 rows.
`gemv_bf16()` returns None when it is unavailable (no compiler, other CPU, PALIGEMMA_KERNELS=0), and
callers fall back to `F.linear`.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
MAX_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y (M, N) = x (M, K) @ w (N, K)^T, bf16 in, bf16 out, fp32 accumulation with AVX512-BF16 dot products.
// For small M (decode): each weight row is streamed once for all M rows of x.
template <int M>
static void rows_kernel(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t N,
                        int64_t n0, int64_t n1) {
  constexpr int R = (M == 1) ? 8 : (M <= 2 ? 6 : (M <= 4 ? 4 : 3));
  int64_t n = n0;
  const int64_t K32 = K / 32 * 32;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const char* next = (const char*)(w + (n + R) * K);  // the next block, prefetched one block ahead
    const at::BFloat16* wr = w + n * K;
    for (int64_t k = 0; k < K32; k += 32) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = (__m512bh)_mm512_loadu_si512((const void*)(wr + r * K + k));
        _mm_prefetch(next + (r * K + k) * 2, _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k));
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        float s = _mm512_reduce_add_ps(acc[r][m]);
        for (int64_t kk = K32; kk < K; ++kk) s += float(x[m * K + kk]) * float(w[(n + r) * K + kk]);
        y[m * N + n + r] = at::BFloat16(s);
      }
  }
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t kk = 0; kk < K; ++kk) s += float(x[m * K + kk]) * float(w[n * K + kk]);
      y[m * N + n] = at::BFloat16(s);
    }
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "M must be 1..8");
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N + 47) / 48, 1, [&](int64_t b0, int64_t b1) {
    int64_t n0 = b0 * 48, n1 = std::min<int64_t>(b1 * 48, N);
    switch (M) {
      case 1: rows_kernel<1>(xp, wp, yp, K, N, n0, n1); break;
      case 2: rows_kernel<2>(xp, wp, yp, K, N, n0, n1); break;
      case 3: rows_kernel<3>(xp, wp, yp, K, N, n0, n1); break;
      case 4: rows_kernel<4>(xp, wp, yp, K, N, n0, n1); break;
      case 5: rows_kernel<5>(xp, wp, yp, K, N, n0, n1); break;
      case 6: rows_kernel<6>(xp, wp, yp, K, N, n0, n1); break;
      case 7: rows_kernel<7>(xp, wp, yp, K, N, n0, n1); break;
      default: rows_kernel<8>(xp, wp, yp, K, N, n0, n1); break;
    }
  });
  return y;
}
"""

_module = None
_tried = False


def gemv_bf16():
    """The compiled `gemv_bf16(x (M, K) bf16, w (N, K) bf16) -> (M, N)` function, or None."""
    global _module, _tried
    if not _tried:
        _tried = True
        _module = _build()
    return None if _module is None else _module.gemv_bf16


def _build():
    if os.environ.get("PALIGEMMA_KERNELS", "1") == "0":
        return None
    try:
        if not torch.cpu._is_avx512_bf16_supported():
            return None
        from torch.utils.cpp_extension import load_inline
        return load_inline("paligemma_gemv_bf16", cpp_sources=[_SOURCE], functions=["gemv_bf16"],
                           extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
                           verbose=False)
    except Exception as err:  # no compiler, headers or CPU support: the plain path still works
        log.warning("paligemma: fast bf16 decode kernel unavailable, using F.linear (%s)", err)
        return None
