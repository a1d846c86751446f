// Row primitives the kernels are written in: fp32 math over rows of head_dim elements.
//
// Two implementations behind one set of names:
//   - AVX-512 (when the compiler targets it and head_dim % 16 == 0): 16 floats per register,
//     bf16 widened with a shift, fp16 with F16C, exp by a range-reduced polynomial.
//   - portable loops (any CPU, any head_dim) that the compiler vectorizes as it can.
// `simd` is a runtime flag so the tests can check the portable path on an AVX-512 machine.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(RADIXRT_PORTABLE)
#include <immintrin.h>
#define RADIXRT_HAVE_AVX512 1
#else
#define RADIXRT_HAVE_AVX512 0
#endif

namespace radixrt {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }  // c10 types round to nearest even

#if RADIXRT_HAVE_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp(x) for x <= 0 (attention probabilities): 2^n * e^r with |r| <= ln2/2, degree-6 Taylor
// polynomial on r (relative error ~2e-7), scaled back with vscalefps. Inputs below -103 give 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// dst[0:d] = float(src[0:d])
template <typename T>
inline void row_to_f32(const T* src, float* dst, int d, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd && d % 16 == 0) {
    for (int i = 0; i < d; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
    return;
  }
#endif
  for (int i = 0; i < d; ++i) dst[i] = to_f32(src[i]);
}

// s[j] = <q, k[j]> for j < n; q and every k row are fp32 of length d.
inline void scores(const float* q, const float* const* k, int n, int d, float* s, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd && d % 16 == 0) {
    if (d == 64) {  // the common case, fully unrolled: two independent FMA chains
      __m512 q0 = load16(q), q1 = load16(q + 16), q2 = load16(q + 32), q3 = load16(q + 48);
      for (int j = 0; j < n; ++j) {
        const float* kj = k[j];
        __m512 a = _mm512_mul_ps(q0, load16(kj));
        __m512 b = _mm512_mul_ps(q1, load16(kj + 16));
        a = _mm512_fmadd_ps(q2, load16(kj + 32), a);
        b = _mm512_fmadd_ps(q3, load16(kj + 48), b);
        s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      }
      return;
    }
    for (int j = 0; j < n; ++j) {
      const float* kj = k[j];
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      int i = 0;
      for (; i + 32 <= d; i += 32) {
        a = _mm512_fmadd_ps(load16(q + i), load16(kj + i), a);
        b = _mm512_fmadd_ps(load16(q + i + 16), load16(kj + i + 16), b);
      }
      if (i < d) a = _mm512_fmadd_ps(load16(q + i), load16(kj + i), a);
      s[j] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
    return;
  }
#endif
  for (int j = 0; j < n; ++j) {
    float acc = 0.f;
    for (int i = 0; i < d; ++i) acc += q[i] * k[j][i];
    s[j] = acc;
  }
}

// x[j] = exp(x[j] - m) for j < n; returns the sum.
inline float exp_sum(float* x, int n, float m, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd) {
    __m512 vm = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      __mmask16 mask = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), vm));
      _mm512_mask_storeu_ps(x + j, mask, e);
      sum = _mm512_mask_add_ps(sum, mask, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }
#endif
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// acc[0:d] = acc * alpha + sum_j p[j] * v[j][0:d]
inline void accumulate(float* acc, float alpha, const float* p, const float* const* v, int n, int d, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd && d % 16 == 0) {
    __m512 va = _mm512_set1_ps(alpha);
    int i = 0;
    for (; i + 32 <= d; i += 32) {  // two output chunks per pass over the rows
      __m512 a = _mm512_mul_ps(load16(acc + i), va), b = _mm512_mul_ps(load16(acc + i + 16), va);
      for (int j = 0; j < n; ++j) {
        __m512 pj = _mm512_set1_ps(p[j]);
        a = _mm512_fmadd_ps(pj, load16(v[j] + i), a);
        b = _mm512_fmadd_ps(pj, load16(v[j] + i + 16), b);
      }
      _mm512_storeu_ps(acc + i, a);
      _mm512_storeu_ps(acc + i + 16, b);
    }
    if (i < d) {
      __m512 a = _mm512_mul_ps(load16(acc + i), va);
      for (int j = 0; j < n; ++j) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v[j] + i), a);
      _mm512_storeu_ps(acc + i, a);
    }
    return;
  }
#endif
  for (int i = 0; i < d; ++i) acc[i] *= alpha;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < d; ++i) acc[i] += p[j] * v[j][i];
}

// Online softmax, one block of n keys at a time, for `rows` query rows over the same key rows:
//   s = q . k^T;  m' = max(m, max s);  l = l * e^(m - m') + sum e^(s - m');
//   acc = acc * e^(m - m') + e^(s - m') . v
// q, acc: `rows` rows of d floats (q pre-scaled); m, l: per row; s: scratch of kMaxGroup * s_stride.
constexpr int kMaxGroup = 4;  // query rows the vector path keeps in registers at once

inline float max_of(const float* x, int n, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd) {
    __m512 mx = _mm512_set1_ps(kNegInf);
    for (int j = 0; j < n; j += 16) {
      __mmask16 mask = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), mask, x + j));
    }
    return _mm512_reduce_max_ps(mx);
  }
#endif
  float mb = x[0];
  for (int j = 1; j < n; ++j) mb = std::max(mb, x[j]);
  return mb;
}

inline void update_stats(float* s, int n, float& m, float& l, float& alpha, bool simd) {
  const float mb = max_of(s, n, simd);
  const float m_new = std::max(m, mb);
  alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
  l = l * alpha + exp_sum(s, n, m_new, simd);
  m = m_new;
}

#if RADIXRT_HAVE_AVX512
// Four dot products at once: the lane sums of a, b, c, d as one 4-float vector (13 shuffles and
// adds for four horizontal sums, where four _mm512_reduce_add_ps would take ~32).
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per lane: a b a b
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// The vector path for d = 16 * NV: each key and value row is read (and widened from bf16/fp16 in
// registers) once for all R query rows; scores come four keys at a time; the R * NV output
// accumulators stay in registers across the block.
template <typename T, int NV, int R>
inline void attend_block_vec(const float* q, const T* const* k, const T* const* v, int n, int d, float* m, float* l,
                             float* acc, float* s, int s_stride) {
  for (int j = 0; j < n; j += 4) {
    __m512 part[R][4];
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      if (j + t < n) {
        const T* kt = k[j + t];
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) {
          const __m512 kc = load16(kt + 16 * c);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m512 qc = _mm512_loadu_ps(q + r * d + 16 * c);
            part[r][t] = c == 0 ? _mm512_mul_ps(qc, kc) : _mm512_fmadd_ps(qc, kc, part[r][t]);
          }
        }
      } else {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) part[r][t] = _mm512_setzero_ps();
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm_storeu_ps(s + r * s_stride + j, hsum4(part[r][0], part[r][1], part[r][2], part[r][3]));
  }
  __m512 a[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float alpha;
    update_stats(s + r * s_stride, n, m[r], l[r], alpha, true);
    const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + 16 * c), va);
  }
  for (int j = 0; j < n; ++j) {
    __m512 p[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) p[r] = _mm512_set1_ps(s[r * s_stride + j]);
    const T* vj = v[j];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      const __m512 vv = load16(vj + 16 * c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r][c] = _mm512_fmadd_ps(p[r], vv, a[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + r * d + 16 * c, a[r][c]);
}

template <typename T, int NV, int RMAX>
inline void attend_rows_vec(const float* q, int rows, const T* const* k, const T* const* v, int n, int d, float* m,
                            float* l, float* acc, float* s, int s_stride) {
  for (int r0 = 0; r0 < rows; r0 += RMAX) {
    const int off = r0 * d;
    switch (std::min(RMAX, rows - r0)) {
      case 1: attend_block_vec<T, NV, 1>(q + off, k, v, n, d, m + r0, l + r0, acc + off, s, s_stride); break;
      case 2: attend_block_vec<T, NV, 2>(q + off, k, v, n, d, m + r0, l + r0, acc + off, s, s_stride); break;
      case 3: attend_block_vec<T, NV, (RMAX >= 3 ? 3 : 1)>(q + off, k, v, n, d, m + r0, l + r0, acc + off, s, s_stride); break;
      default: attend_block_vec<T, NV, (RMAX >= 4 ? 4 : 1)>(q + off, k, v, n, d, m + r0, l + r0, acc + off, s, s_stride); break;
    }
  }
}
#endif

// Whether attend_rows_direct takes key/value rows in the cache's own dtype (no fp32 copy).
inline bool has_direct_path(int d, bool simd) { return RADIXRT_HAVE_AVX512 && simd && (d == 64 || d == 128); }

template <typename T>
inline void attend_rows_direct(const float* q, int rows, const T* const* k, const T* const* v, int n, int d, float* m,
                               float* l, float* acc, float* s, int s_stride) {
#if RADIXRT_HAVE_AVX512
  if (d == 64) return attend_rows_vec<T, 4, 4>(q, rows, k, v, n, d, m, l, acc, s, s_stride);
  if (d == 128) return attend_rows_vec<T, 8, 2>(q, rows, k, v, n, d, m, l, acc, s, s_stride);
#endif
}

inline void attend_rows(const float* q, int rows, const float* const* k, const float* const* v, int n, int d, float* m,
                        float* l, float* acc, float* s, int s_stride, bool simd) {
  for (int r = 0; r < rows; ++r) {
    float alpha;
    scores(q + r * d, k, n, d, s, simd);
    update_stats(s, n, m[r], l[r], alpha, simd);
    accumulate(acc + r * d, alpha, s, v, n, d, simd);
  }
}

}  // namespace radixrt
