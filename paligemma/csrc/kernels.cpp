// paligemma's CPU kernels: weight-streaming matrix-vector products for decode steps, int8/int4
// (de)quantization for loading and prefill. One source, compiled once per instruction-set level by
// kernels.py with -DPALIGEMMA_AVX512 (AVX-512 + AVX512-BF16) or -DPALIGEMMA_AVX2 (AVX2 + FMA).
//
// The kernels are written against the small vector layer below: `vf` holds W float32 lanes (16 with
// AVX-512, 8 with AVX2), with loads that widen bf16 / int8 / 4-bit weights to float32 in registers
// (bf16 is the top half of a float32: widening is a 16-bit shift). Everything accumulates in float32.
// The AVX-512 build adds two inner loops of its own that multiply bf16 pairs with `vdpbf16ps`.
//
// Shapes: x (M, K) activations, M <= 8 rows; weights (N, K) row-major, one output per weight row;
// y (M, N). Work is split over weight rows with at::parallel_for (every thread torch may use).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

// ------------------------------------------------------------------------------ the per-ISA layer

#if defined(PALIGEMMA_AVX512)
static constexpr const char* kIsa = "avx512bf16";
static constexpr int W = 16;
using vf = __m512;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float v) { return _mm512_set1_ps(v); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float vmaxall(vf v) { return _mm512_reduce_max_ps(v); }
static inline vf vload(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
// W bytes -> their low and high nibbles (0..15) as float32: widened to 32 bits first, where the high
// nibble is a plain shift and the low one a mask.
static inline void vload_nibbles(const uint8_t* p, vf& low, vf& high) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  low = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  high = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
// W (first, second) bf16 pairs, interleaved in memory, as two float32 vectors.
static inline void vload_pairs(const at::BFloat16* p, vf& first, vf& second) {
  const __m512i v = _mm512_loadu_si512((const void*)p);
  first = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  second = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000)));
}
static inline void vstore(at::BFloat16* p, vf v) {  // round to nearest even
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline void vstore(int8_t* p, vf v) {  // v already integral and within -127..127
  _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
}

#elif defined(PALIGEMMA_AVX2)
static constexpr const char* kIsa = "avx2";
static constexpr int W = 8;
using vf = __m256;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float v) { return _mm256_set1_ps(v); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vmaxall(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vload(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vf vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline void vload_nibbles(const uint8_t* p, vf& low, vf& high) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  low = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  high = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
static inline void vload_pairs(const at::BFloat16* p, vf& first, vf& second) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  first = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  second = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000)));
}
static inline void vstore(at::BFloat16* p, vf v) {
  // Round to nearest even, as at::BFloat16 does: add 0x7FFF plus the lowest kept bit, keep the top 16.
  // NaNs stay NaN: the quiet bit sits in the kept half.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i halves = _mm256_blendv_epi8(rounded, _mm256_srli_epi32(_mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), 16), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
  _mm_storeu_si128((__m128i*)p, packed);
}
static inline void vstore(int8_t* p, vf v) {
  const __m256i i = _mm256_cvtps_epi32(v);
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64((__m128i*)p, _mm_packs_epi16(words, words));
}

#else
#error "compile with -DPALIGEMMA_AVX512 or -DPALIGEMMA_AVX2 (kernels.py does)"
#endif

static inline float to_float(at::BFloat16 v) { return float(v); }
static inline float to_float(float v) { return v; }
static inline float to_float(int8_t v) { return float(v); }

// x (M, K) bf16 -> float32 copy, converted once per call and shared by every thread.
static std::vector<float> widen_rows(const torch::Tensor& x) {
  const int64_t count = x.numel();
  std::vector<float> out(count);
  const auto* p = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < count; ++i) out[i] = float(p[i]);
  return out;
}

static constexpr int64_t kRowsPerTask = 48;  // weight rows per parallel_for task

// ------------------------------------------------------------------------------ bf16 / int8 GEMV

// Rows n0..n1 of y = x @ w^T for w of bf16 or int8 (int8: times one float32 scale per G inputs; bf16
// passes G = K and no scales). One weight row at a time, front to back: a row-major weight is then
// one sequential stream, which the hardware prefetcher follows best. C independent accumulator chains
// per input row hide the FMA latency (4-5 cycles): with 1-2 input rows, 4; with more rows, the rows'
// own chains do, and fewer keep the accumulators in registers.
template <int M, typename T>
static void fma_rows(const float* x, const T* w, const float* scales, at::BFloat16* y, int64_t K, int64_t N,
                     int64_t G, int64_t n0, int64_t n1) {
  constexpr int C = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = w + n * K;
    float total[M] = {};
    for (int64_t g = 0; g < groups; ++g) {
      vf acc[C][M];
      for (int c = 0; c < C; ++c) for (int m = 0; m < M; ++m) acc[c][m] = vzero();
      int64_t k = g * G;
      const int64_t end = k + G;
      for (; k + C * W <= end; k += C * W) {
        _mm_prefetch((const char*)(row + k) + 2048, _MM_HINT_T0);
        for (int c = 0; c < C; ++c) {
          const vf wv = vload(row + k + c * W);
          for (int m = 0; m < M; ++m) acc[c][m] = vfma(wv, vload(x + m * K + k + c * W), acc[c][m]);
        }
      }
      for (; k + W <= end; k += W) {
        const vf wv = vload(row + k);
        for (int m = 0; m < M; ++m) acc[0][m] = vfma(wv, vload(x + m * K + k), acc[0][m]);
      }
      const float scale = scales ? scales[n * groups + g] : 1.f;
      for (int m = 0; m < M; ++m) {
        vf sum = acc[0][m];
        for (int c = 1; c < C; ++c) sum = vadd(sum, acc[c][m]);
        float s = vsum(sum);
        for (int64_t kk = k; kk < end; ++kk) s += x[m * K + kk] * to_float(row[kk]);  // odd K (bf16 only)
        total[m] += s * scale;
      }
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = at::BFloat16(total[m]);
  }
}

// fma_rows for any M <= 8: more than 4 input rows go in two passes over each task's weight rows (the
// second reads them from cache), which keeps every accumulator in a register.
template <typename T>
static void fma_rows_any(int64_t M, const float* x, const T* w, const float* scales, at::BFloat16* y, int64_t K,
                         int64_t N, int64_t G, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: fma_rows<1>(x, w, scales, y, K, N, G, n0, n1); break;
    case 2: fma_rows<2>(x, w, scales, y, K, N, G, n0, n1); break;
    case 3: fma_rows<3>(x, w, scales, y, K, N, G, n0, n1); break;
    case 4: fma_rows<4>(x, w, scales, y, K, N, G, n0, n1); break;
    default:
      fma_rows<4>(x, w, scales, y, K, N, G, n0, n1);
      fma_rows_any(M - 4, x + 4 * K, w, scales, y + 4 * N, K, N, G, n0, n1);
  }
}

template <typename Fn>
static void dispatch_rows(int64_t M, Fn&& fn) {
  switch (M) {
    case 1: fn(std::integral_constant<int, 1>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 6: fn(std::integral_constant<int, 6>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    default: fn(std::integral_constant<int, 8>()); break;
  }
}

#if defined(PALIGEMMA_AVX512)
// AVX512-BF16 inner loops: bf16 pairs multiplied by `vdpbf16ps` straight from memory, no widening.

// A block of R weight rows side by side, each loaded slice of x reused for the whole block: better than
// one row at a time for long rows (K = 16384: x no longer fits L1) or more input rows.
template <int M>
static void dpbf16_block_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t N,
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

// One weight row at a time, front to back (see fma_rows), for 1-2 input rows and K <= 4096.
template <int M>
static void dpbf16_stream_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t N,
                               int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* row = w + n * K;
    __m512 acc0[M], acc1[M];
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

// 32 int8 weights -> 32 bf16 (exact: |q| <= 127 fits bf16's 8-bit significand), in order.
static inline __m512bh int8x32_to_bf16(const int8_t* p) {
  return _mm512_cvtne2ps_pbh(vload(p + 16), vload(p));  // lanes 0..15 from p, 16..31 from p + 16
}

// Row-at-a-time int8 GEMV on `vdpbf16ps`: 32 int8 weights widened to bf16 per step, each group's
// float32 sum scaled once.
template <int M>
static void dpbf16_int8_rows(const at::BFloat16* x, const int8_t* q, const float* s, at::BFloat16* y,
                             int64_t K, int64_t N, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
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
}
#endif

static void check_rows(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: (M, K) bf16");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "x: M must be 1..8");
}

// y (M, N) bf16 = x (M, K) bf16 @ w (N, K) bf16 ^T.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), "w: contiguous (N, K) bf16");
  check_rows(x, w.size(1));
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
#if defined(PALIGEMMA_AVX512)
  const auto* xp = x.data_ptr<at::BFloat16>();
  dispatch_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * kRowsPerTask, n1 = std::min(b1 * kRowsPerTask, N);
      if (R <= 2 && K <= 4096) dpbf16_stream_rows<R>(xp, wp, yp, K, N, n0, n1);
      else dpbf16_block_rows<R>(xp, wp, yp, K, N, n0, n1);
    });
  });
#else
  const std::vector<float> xf = widen_rows(x);
  at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b0, int64_t b1) {
    fma_rows_any(M, xf.data(), wp, (const float*)nullptr, yp, K, N, K, b0 * kRowsPerTask,
                 std::min(b1 * kRowsPerTask, N));
  });
#endif
  return y;
}

static int64_t check_int8(const torch::Tensor& q, const torch::Tensor& s) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "q: contiguous (N, K) int8");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.is_contiguous() && s.size(0) == q.size(0),
              "scales: contiguous (N, K / G) float32");
  const int64_t K = q.size(1), groups = s.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0, "group size must divide K and be a multiple of 32");
  return K / groups;
}

// y (M, N) bf16 = x (M, K) bf16 @ (q * s)^T, q int8 (N, K), s (N, K/G) float32: 1 byte per weight streamed.
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t G = check_int8(q, s);
  check_rows(x, q.size(1));
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto* qp = q.data_ptr<int8_t>();
  const auto* sp = s.data_ptr<float>();
  auto* yp = y.data_ptr<at::BFloat16>();
#if defined(PALIGEMMA_AVX512)
  const auto* xp = x.data_ptr<at::BFloat16>();
  dispatch_rows(M, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b0, int64_t b1) {
      dpbf16_int8_rows<R>(xp, qp, sp, yp, K, N, G, b0 * kRowsPerTask, std::min(b1 * kRowsPerTask, N));
    });
  });
#else
  const std::vector<float> xf = widen_rows(x);
  at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b0, int64_t b1) {
    fma_rows_any(M, xf.data(), qp, sp, yp, K, N, G, b0 * kRowsPerTask, std::min(b1 * kRowsPerTask, N));
  });
#endif
  return y;
}

// ------------------------------------------------------------------------------ int8 (de)quantization

// out (N, K) = q * s in out's dtype (bf16: rounded to nearest even; float32: exact product), written into
// a caller's buffer (reused across calls: a fresh tensor would cost a page fault per 4 KB, several times
// the conversion itself).
template <typename Out>
static void dequantize_int8_into(const int8_t* q, const float* s, Out* out, int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const vf scale = vset1(s[n * groups + g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += W) vstore(out + n * K + k, vmul(vload(q + n * K + k), scale));
      }
  });
}

void dequantize_int8(torch::Tensor q, torch::Tensor s, torch::Tensor out) {
  const int64_t G = check_int8(q, s);
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == K,
              "out: contiguous (N, K)");
  if (out.scalar_type() == at::kBFloat16)
    dequantize_int8_into(q.data_ptr<int8_t>(), s.data_ptr<float>(), out.data_ptr<at::BFloat16>(), N, K, G);
  else if (out.scalar_type() == at::kFloat)
    dequantize_int8_into(q.data_ptr<int8_t>(), s.data_ptr<float>(), out.data_ptr<float>(), N, K, G);
  else
    TORCH_CHECK(false, "out: bf16 or float32");
}

// q (N, K) int8 and s (N, K/G) float32 from w (N, K): symmetric per group, s = max(max|w| / 127, 1e-8),
// q = round-half-even(w / s) clamped to +-127 -- the same float operations as quantize.py's torch code.
template <typename T>
static void quantize_rows(const T* w, int8_t* q, float* s, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  const vf lo = vset1(-127.f), hi = vset1(127.f);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = w + n * K + g * G;
      vf amax = vzero();
      for (int64_t i = 0; i < G; i += W) amax = vmax(amax, vabs(vload(src + i)));
      const float scale = std::max(vmaxall(amax) / 127.f, 1e-8f);
      s[n * groups + g] = scale;
      const vf divisor = vset1(scale);
      int8_t* dst = q + n * K + g * G;
      for (int64_t i = 0; i < G; i += W) vstore(dst + i, vmin(hi, vmax(lo, vround(vdiv(vload(src + i), divisor)))));
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

// ------------------------------------------------------------------------------ int4

// The packed int4 layout (quantize.py's `pack_int4`, the same bytes torch's AVX-512 int4 packer writes):
// weight rows in blocks of 64; for each input column k a block holds 32 bytes whose low nibbles are its
// rows 0-31 and high nibbles its rows 32-63, in order. A weight is (q - 8) * scale + zero, q in 0..15,
// with a (scale, zero) bf16 pair per row and group of G inputs: scales_zeros (K/G, N, 2).

static void check_int4(const torch::Tensor& packed, const torch::Tensor& sz) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 && packed.size(0) % 64 == 0,
              "packed: contiguous (N, K/2) uint8, N a multiple of 64");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(1) == N &&
              sz.size(2) == 2 && K % sz.size(0) == 0 && (K / sz.size(0)) % 2 == 0, "scales_zeros: contiguous (K/G, N, 2) bf16");
}

// (scale, zero) of rows n .. n + 63 for one group, as float32 vectors (rows v*W .. v*W + W - 1 in [v]).
static inline void block_scales(const at::BFloat16* sz, int64_t g, int64_t N, int64_t n, vf* scale, vf* zero) {
  for (int v = 0; v < 64 / W; ++v) vload_pairs(sz + (g * N + n + v * W) * 2, scale[v], zero[v]);
}

// The 64 q values (0..15) of one input column of a 64-row block, from its 32 bytes: byte i holds row i in
// its low nibble and row 32 + i in its high one. `use(v, q)` gets rows v*W .. v*W + W - 1.
template <typename Use>
static inline void block_column(const uint8_t* bytes, Use&& use) {
  for (int i = 0; i < 32; i += W) {
    vf low, high;
    vload_nibbles(bytes + i, low, high);
    use(i / W, low);
    use((32 + i) / W, high);
  }
}

// out (K, n) = weight rows n0 .. n0 + n dequantized and transposed (out[k][j] = weight row n0 + j, input k).
template <typename Out>
static void dequantize_int4_into(const uint8_t* packed, const at::BFloat16* sz, Out* out, int64_t N, int64_t K,
                                 int64_t G, int64_t n0, int64_t n) {
  const int64_t groups = K / G;
  at::parallel_for(0, n / 64, 1, [&](int64_t b0, int64_t b1) {
    const vf eight = vset1(8.f);
    vf scale[64 / W], zero[64 / W];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = packed + (n0 / 64 + b) * K * 32;
      for (int64_t g = 0; g < groups; ++g) {
        block_scales(sz, g, N, n0 + 64 * b, scale, zero);
        for (int64_t k = g * G; k < (g + 1) * G; ++k)
          block_column(block + k * 32, [&](int v, vf q) {
            vstore(out + k * n + 64 * b + v * W, vfma(vsub(q, eight), scale[v], zero[v]));
          });
      }
    }
  });
}

void dequantize_int4(torch::Tensor packed, torch::Tensor sz, int64_t n0, torch::Tensor out) {
  check_int4(packed, sz);
  const int64_t N = packed.size(0), K = packed.size(1) * 2, n = out.size(1), G = K / sz.size(0);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == K, "out: contiguous (K, n)");
  TORCH_CHECK(n0 % 64 == 0 && n % 64 == 0 && n0 + n <= N, "rows: whole blocks of 64");
  const auto* pp = packed.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  if (out.scalar_type() == at::kBFloat16) dequantize_int4_into(pp, sp, out.data_ptr<at::BFloat16>(), N, K, G, n0, n);
  else if (out.scalar_type() == at::kFloat) dequantize_int4_into(pp, sp, out.data_ptr<float>(), N, K, G, n0, n);
  else TORCH_CHECK(false, "out: bf16 or float32");
}

// y (M, N) bf16 = x (M, K) bf16 @ int4 weight^T, 0.5 byte per weight streamed. Per 64-row block and
// group, each input row m keeps 64 float32 sums of q * x[k] (q = 0..15, the nibbles as stored); the
// group then adds scale * (sum - 8 * sum(x)) + zero * sum(x) to each output, which is the sum of
// ((q - 8) * scale + zero) * x[k]. One input row multiplies the nibbles as they are unpacked; several
// unpack a group's (G, 64) nibbles once into an L1-resident float32 buffer and multiply from there.
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor sz) {
  check_int4(packed, sz);
  const int64_t N = packed.size(0), K = packed.size(1) * 2, groups = sz.size(0), G = K / groups;
  check_rows(x, K);
  TORCH_CHECK(G <= 256, "group size must be <= 256");
  x = x.contiguous();
  const int64_t M = x.size(0);
  const std::vector<float> xf = widen_rows(x);
  std::vector<float> xsums(M * groups);  // sum of x over each group
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xf[m * K + k];
      xsums[m * groups + g] = s;
    }
  auto y = torch::empty({M, N}, x.options());
  const auto* pp = packed.data_ptr<uint8_t>();
  const auto* sp = sz.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  constexpr int V = 64 / W;  // vectors per block of 64 rows
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[64];
    vf scale[V], zero[V];
    std::vector<float> unpacked(M > 1 ? G * 64 : 0);  // (G, 64) nibbles of one group, as float32
    vf total[8 * V];  // (M, 64 rows) output sums of the block
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = pp + b * K * 32;
      for (int64_t i = 0; i < M * V; ++i) total[i] = vzero();
      for (int64_t g = 0; g < groups; ++g) {
        block_scales(sp, g, N, 64 * b, scale, zero);
        const uint8_t* bytes = block + g * G * 32;
        _mm_prefetch((const char*)(bytes + G * 32), _MM_HINT_T0);
        if (M > 1)
          for (int64_t k = 0; k < G; ++k)
            block_column(bytes + k * 32, [&](int v, vf q) { vstore(unpacked.data() + k * 64 + v * W, q); });
        for (int64_t m = 0; m < M; ++m) {
          const float* xg = xf.data() + m * K + g * G;
          vf acc[V];
          for (int v = 0; v < V; ++v) acc[v] = vzero();
          for (int64_t k = 0; k < G; ++k) {
            const vf xk = vset1(xg[k]);
            if (M == 1) {
              block_column(bytes + k * 32, [&](int v, vf q) { acc[v] = vfma(q, xk, acc[v]); });
            } else {
              for (int v = 0; v < V; ++v) acc[v] = vfma(vload(unpacked.data() + k * 64 + v * W), xk, acc[v]);
            }
          }
          const float xs = xsums[m * groups + g];
          const vf xsum = vset1(xs), minus_8xsum = vset1(-8.f * xs);
          for (int v = 0; v < V; ++v) {  // total += scale * (acc - 8 sum(x)) + zero * sum(x)
            const vf with_zero = vfma(zero[v], xsum, total[m * V + v]);
            total[m * V + v] = vfma(vadd(acc[v], minus_8xsum), scale[v], with_zero);
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int v = 0; v < V; ++v) vstore(out + v * W, total[m * V + v]);
        for (int r = 0; r < 64; ++r) yp[m * N + 64 * b + r] = at::BFloat16(out[r]);
      }
    }
  });
  return y;
}

std::string isa() { return kIsa; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the instruction-set level this build was compiled for");
  m.def("gemv_bf16", &gemv_bf16, "y (M, N) = x (M, K) @ w (N, K)^T, bf16, M <= 8");
  m.def("gemv_int8", &gemv_int8, "y (M, N) = x (M, K) @ (q * scales)^T, int8 weights, M <= 8");
  m.def("gemv_int4", &gemv_int4, "y (M, N) = x (M, K) @ int4 weight^T (64-row packed layout), M <= 8");
  m.def("dequantize_int8", &dequantize_int8, "out (N, K) bf16 | f32 = q * scales");
  m.def("quantize_int8", &quantize_int8, "fill q (N, K) int8 and scales (N, K/G) from w (N, K) bf16 | f32");
  m.def("dequantize_int4", &dequantize_int4, "out (K, n) bf16 | f32 = int4 weight rows n0 .. n0 + n, transposed");
}
