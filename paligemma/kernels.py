"""A small C++ kernel for the decode step: bf16 matrix times a few vectors, at memory speed.

At batch 1, a decode step is a chain of matrix-vector products whose cost is streaming the weights.
torch's bf16 `F.linear` streams a row-major weight at ~9-13 GB/s on the benchmark CPU (AMD EPYC,
AVX-512) against ~27-34 GB/s that a plain sum reaches. This kernel uses AVX512-BF16 dot products
(`vdpbf16ps`, fp32 accumulation) and reads the weight in one of two orders: for 1-2 input rows and
rows of <= 4096 inputs, one weight row at a time front to back (one sequential stream; 20-25 GB/s),
otherwise a block of weight rows side by side, each loaded slice of x reused for the whole block
(better for long rows and up to 8 input rows). `python benchmarks/bench_kernels.py` measures both
against `F.linear` (BENCHMARKS.md).

It is compiled on first use with torch's C++ extension loader (about 40 s, cached under
~/.cache/torch_extensions) and used only where it applies: bf16, CPU with AVX512-BF16, <= 8 rows.
`gemv_bf16()` returns None when it is unavailable (no compiler, other CPU, PALIGEMMA_KERNELS=0), and
callers fall back to `F.linear`.

The same extension holds the int8 weight-only kernels that quantize.py uses:

    gemv_int8(x (M, K) bf16, q (N, K) int8, scales (N, K/G) float32) -> (M, N) bf16, M <= 8
    dequantize_int8(q (N, K) int8, scales (N, K/G) float32, out (N, K) bf16): out = bf16(q * scale)
    quantize_int8(w (N, K) bf16 | float32, q (N, K) int8, scales (N, K/G) float32): fills q and scales

and one for int4 prefill (quantize.py), on torch's packed int4 layout:

    dequantize_int4(packed (N, K/2) uint8, scales_zeros (K/G, N, 2) bf16, n0, out (K, n) bf16):
        out = weight rows n0 .. n0 + n, dequantized and transposed

`gemv_int8` streams 1 byte per weight: each 32 int8 weights are widened to bf16 in registers
(exact: |q| <= 127 fits bf16's 8-bit significand), multiplied with `vdpbf16ps`, and each group's fp32
sum is scaled once. `dequantize_int8` feeds `F.linear` for larger inputs (prefill); `quantize_int8`
makes loading with quantize="int8" ~10x faster than the same arithmetic in torch ops.
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

// Rows n0..n1 of y (M, N) = x (M, K) @ w (N, K)^T one weight row at a time, front to back: since w is
// row-major, the whole block is then one sequential stream, which the hardware prefetcher follows
// best. Faster than rows_kernel for short rows and 1-2 input rows (x stays in L1 and is re-read per
// weight row); for long rows (K = 16384: x no longer fits L1) or more input rows, rows_kernel, which
// reuses each x load for several weight rows, wins (microbenchmarks in BENCHMARKS.md).
template <int M>
static void stream_rows_kernel(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t N,
                               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* row = w + n * K;
    __m512 acc0[M], acc1[M];  // two accumulator chains hide the dot product's latency
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      _mm_prefetch((const char*)(row + k) + 2048, _MM_HINT_T0);
      _mm_prefetch((const char*)(row + k) + 2048 + 64, _MM_HINT_T0);
      __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(row + k));
      __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(row + k + 32));
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k)));
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k + 32)));
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
      for (int64_t kk = k; kk < K; ++kk) s += float(x[m * K + kk]) * float(row[kk]);
      y[m * N + n] = at::BFloat16(s);
    }
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
    if (M <= 2 && K <= 4096) {
      if (M == 1) stream_rows_kernel<1>(xp, wp, yp, K, N, n0, n1);
      else stream_rows_kernel<2>(xp, wp, yp, K, N, n0, n1);
      return;
    }
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

// 32 int8 weights -> float32, weights 0..15 in lo and 16..31 in hi.
static inline void int8x32_to_f32(const int8_t* p, __m512& lo, __m512& hi) {
  lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
}

// 32 int8 weights -> 32 bf16 (exact), in the element order of the int8s.
static inline __m512bh int8x32_to_bf16(const int8_t* p) {
  __m512 lo, hi;
  int8x32_to_f32(p, lo, hi);
  return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 from lo, 16..31 from hi
}

// Row n of y (M, N) = x (M, K) @ (q * s)^T, q int8 (N, K), s (N, K/G): one scale per G inputs.
// One weight row at a time, read front to back, is one sequential stream the hardware prefetcher
// follows (several rows read side by side, as in rows_kernel, streamed at half the speed here), with
// an explicit prefetch 2 KB ahead; two accumulator chains per input row hide the dot product's latency.
template <int M>
static void int8_row(const at::BFloat16* x, const int8_t* q, const float* s, at::BFloat16* y,
                     int64_t K, int64_t N, int64_t G, int64_t n) {
  const int64_t groups = K / G;
  const int8_t* row = q + n * K;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t k = g * G;
    const int64_t end = k + G;
    for (; k + 64 <= end; k += 64) {
      _mm_prefetch((const char*)(row + k) + 2048, _MM_HINT_T0);
      __m512bh w0 = int8x32_to_bf16(row + k), w1 = int8x32_to_bf16(row + k + 32);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k)));
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k + 32)));
      }
    }
    if (k < end) {  // G = 32, or an odd multiple of 32
      __m512bh w0 = int8x32_to_bf16(row + k);
      for (int m = 0; m < M; ++m)
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k)));
    }
    __m512 scale = _mm512_set1_ps(s[n * groups + g]);
    for (int m = 0; m < M; ++m) total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), scale, total[m]);
  }
  for (int m = 0; m < M; ++m) y[m * N + n] = at::BFloat16(_mm512_reduce_add_ps(total[m]));
}

template <int M>
static void int8_rows(const at::BFloat16* x, const int8_t* q, const float* s, at::BFloat16* y,
                      int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) int8_row<M>(x, q, s, y, K, N, G, n);
}

static int64_t check_int8(const torch::Tensor& q, const torch::Tensor& s) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "q: contiguous (N, K) int8");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.is_contiguous() && s.size(0) == q.size(0),
              "scales: contiguous (N, K / G) float32");
  const int64_t K = q.size(1), groups = s.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0, "group size must divide K and be a multiple of 32");
  return K / groups;
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t G = check_int8(q, s);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == q.size(1), "x: (M, K) bf16");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "M must be 1..8");
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* qp = q.data_ptr<int8_t>();
  const auto* sp = s.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N + 47) / 48, 1, [&](int64_t b0, int64_t b1) {
    int64_t n0 = b0 * 48, n1 = std::min<int64_t>(b1 * 48, N);
    switch (M) {
      case 1: int8_rows<1>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 2: int8_rows<2>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 3: int8_rows<3>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 4: int8_rows<4>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 5: int8_rows<5>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 6: int8_rows<6>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      case 7: int8_rows<7>(xp, qp, sp, yp, K, N, G, n0, n1); break;
      default: int8_rows<8>(xp, qp, sp, yp, K, N, G, n0, n1); break;
    }
  });
  return y;
}

// out (N, K) bf16 = bf16(q * s), written into a caller's buffer (reused across calls: a fresh
// tensor would cost a page fault per 4 KB, several times the conversion itself).
void dequantize_int8(torch::Tensor q, torch::Tensor s, torch::Tensor out) {
  const int64_t G = check_int8(q, s);
  const int64_t N = q.size(0), K = q.size(1), groups = K / G;
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.size(0) == N && out.size(1) == K,
              "out: contiguous (N, K) bf16");
  const auto* qp = q.data_ptr<int8_t>();
  const auto* sp = s.data_ptr<float>();
  auto* wp = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        __m512 scale = _mm512_set1_ps(sp[n * groups + g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          __m512 lo, hi;
          int8x32_to_f32(qp + n * K + k, lo, hi);
          __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
          _mm512_storeu_si512((void*)(wp + n * K + k), (__m512i)v);
        }
      }
  });
}

// q (N, K) int8 and s (N, K/G) float32 from w (N, K): symmetric per group, s = max(max|w| / 127, 1e-8),
// q = round-half-even(w / s) clamped to +-127 -- the same float operations as quantize.py's torch code.
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_f32(const at::BFloat16* p) {  // bf16 is the top half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

template <typename T>
static void quantize_rows(const T* w, int8_t* q, float* s, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = w + n * K + g * G;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < G; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_f32(src + i)));
      const float scale = std::max(_mm512_reduce_max_ps(amax) / 127.f, 1e-8f);
      s[n * groups + g] = scale;
      const __m512 divisor = _mm512_set1_ps(scale);
      int8_t* dst = q + n * K + g * G;
      for (int64_t i = 0; i < G; i += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16_f32(src + i), divisor),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
      }
    }
}

void quantize_int8(torch::Tensor w, torch::Tensor q, torch::Tensor s) {
  const int64_t G = check_int8(q, s);
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == q.size(0) && w.size(1) == q.size(1),
              "w: contiguous (N, K) like q");
  const int64_t N = q.size(0), K = q.size(1);
  auto* qp = q.data_ptr<int8_t>();
  auto* sp = s.data_ptr<float>();
  if (w.scalar_type() == at::kBFloat16) {
    const auto* wp = w.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { quantize_rows(wp, qp, sp, K, G, n0, n1); });
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "w: bf16 or float32");
    const auto* wp = w.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { quantize_rows(wp, qp, sp, K, G, n0, n1); });
  }
}

// Rows n0 .. n0 + n of an int4 weight in torch's packed CPU layout (its AVX-512 build), dequantized and
// transposed: out (K, n) bf16, out[k][j] = bf16((q - 8) * scale + zero) of weight row n0 + j. The layout
// holds rows in blocks of 64; for each input column k a block has 32 bytes whose low nibbles are its rows
// 0-31 and high nibbles its rows 32-63, in order. scales_zeros (K/G, N, 2) bf16: (scale, zero) pairs.
void dequantize_int4(torch::Tensor packed, torch::Tensor sz, int64_t n0, torch::Tensor out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed: contiguous (N, K/2) uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, n = out.size(1);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(1) == N &&
              sz.size(2) == 2 && K % sz.size(0) == 0, "scales_zeros: contiguous (K/G, N, 2) bf16");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == K,
              "out: contiguous (K, n) bf16");
  TORCH_CHECK(n0 % 64 == 0 && n % 64 == 0 && n0 + n <= N, "rows: whole blocks of 64");
  const int64_t groups = sz.size(0), G = K / groups;
  const auto* pp = packed.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());  // (scale, zero) pairs
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n / 64, 1, [&](int64_t b0, int64_t b1) {
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m512 eight = _mm512_set1_ps(8.f);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = pp + (n0 / 64 + b) * K * 32;
      for (int64_t g = 0; g < groups; ++g) {
        __m512 scale[4], zero[4];  // for rows 16c .. 16c + 15 of the block
        for (int c = 0; c < 4; ++c) {
          __m512i pairs = _mm512_loadu_si512(sp + g * N + n0 + 64 * b + 16 * c);  // bf16 scale low, zero high
          scale[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
          zero[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
        }
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const __m256i bytes = _mm256_loadu_si256((const __m256i*)(block + k * 32));
          const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
          const __m128i quarters[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                       _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
          for (int c = 0; c < 4; ++c) {
            __m512 q = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(quarters[c])), eight);
            __m512 w = _mm512_fmadd_ps(q, scale[c], zero[c]);
            _mm256_storeu_si256((__m256i*)(op + k * n + 64 * b + 16 * c), (__m256i)_mm512_cvtneps_pbh(w));
          }
        }
      }
    }
  });
}
"""

_FUNCTIONS = ["gemv_bf16", "gemv_int8", "dequantize_int8", "quantize_int8", "dequantize_int4"]
_module = None
_tried = False


def _compiled():
    global _module, _tried
    if not _tried:
        _tried = True
        _module = _build()
    return _module


def gemv_bf16():
    """The compiled `gemv_bf16(x (M, K) bf16, w (N, K) bf16) -> (M, N)` function, or None."""
    return None if _compiled() is None else _compiled().gemv_bf16


def gemv_int8():
    """The compiled `gemv_int8(x (M, K) bf16, q (N, K) int8, scales (N, K/G) f32) -> (M, N) bf16`, or None."""
    return None if _compiled() is None else _compiled().gemv_int8


def dequantize_int8():
    """The compiled `dequantize_int8(q (N, K) int8, scales (N, K/G) f32, out (N, K) bf16)`, or None."""
    return None if _compiled() is None else _compiled().dequantize_int8


def _build():
    if os.environ.get("PALIGEMMA_KERNELS", "1") == "0":
        return None
    try:
        if not torch.cpu._is_avx512_bf16_supported():
            return None
        from torch.utils.cpp_extension import load_inline
        return load_inline("paligemma_kernels", cpp_sources=[_SOURCE], functions=_FUNCTIONS,
                           extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
                           verbose=False)
    except Exception as err:  # no compiler, headers or CPU support: the plain path still works
        log.warning("paligemma: fast decode kernels unavailable, using F.linear (%s)", err)
        return None


def quantize_int8():
    """The compiled `quantize_int8(w (N, K) bf16 | f32, q (N, K) int8, scales (N, K/G) f32)`, or None."""
    return None if _compiled() is None else _compiled().quantize_int8


def dequantize_int4():
    """The compiled `dequantize_int4(packed (N, K/2) u8, scales_zeros (K/G, N, 2) bf16, n0, out (K, n) bf16)`
    (torch's AVX-512 int4 layout: check quantize._packs_like_torch), or None."""
    return None if _compiled() is None else _compiled().dequantize_int4
