// Weight-only quantized linear layers: out = x @ W^T with W held as 4- or 8-bit integers.
//
//   w[n, k] = s[n, g] * q[n, k] + o[n, g]        g = k / G (a group of G consecutive inputs)
//   int4: q in [0, 15], offsets o always present (asymmetric; GGUF's Q4_0, Q4_1, Q4_K map onto it)
//   int8: q in [-128, 127], offsets optional (symmetric per channel, or GGUF's Q8_0 / Q6_K groups)
//
// Packed layout (radixrt/model/quant.py packs and unpacks it): output channels in blocks of 16,
// inputs in pairs, so that one 32-bit lane of a vector holds one channel's weights for one
// pair of inputs -- what AVX512_BF16's dot product (vdpbf16ps) multiplies against a broadcast
// pair of activations, giving the 16 channels' partial sums in the 16 fp32 lanes of one register.
//
//   qweight, int4: [N_pad/16][K/4][32 bytes]   one 32-byte chunk = 16 channels x 4 inputs
//                  byte 2j+e of chunk c:  low nibble  = q[16 nb + j, 4c + e]
//                                         high nibble = q[16 nb + j, 4c + 2 + e]      (e = 0, 1)
//   qweight, int8: [N_pad/16][K/2][32 bytes]   byte 2j+e of pair p = q[16 nb + j, 2p + e]
//   scales, offsets: [N_pad/16][K/G][16]       fp16 or fp32, one vector per block and group
//
// The vector path widens 32 nibbles to 16-bit lanes and ORs in 0x4300, the bf16 bits of 128:
// the lane then reads as the bf16 number 128 + q, exactly. A group's dot product is therefore
//   sum_k w x = s * t + (o - 128 s) * xsum,   t = sum_k (128 + q) x,  xsum = sum_k x
// with t from vdpbf16ps and xsum computed once per row and group. int8 lanes are widened
// through fp32 (exact for |q| <= 128). Activations are rounded to bf16 once per call; all sums
// are fp32. R rows of x share each widened weight chunk (register tiles of R x 16 outputs).
//
// From `dequantize_min_rows` rows on (a prefill chunk), the weight is instead dequantized to bf16
// (weights rounded to bf16) and multiplied by torch's bf16 GEMM, which is faster at that size.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "simd.h"

#if RADIXRT_HAVE_AVX512 && defined(__AVX512BF16__)
#define RADIXRT_HAVE_BF16_DOT 1
#else
#define RADIXRT_HAVE_BF16_DOT 0
#endif

namespace radixrt {
namespace {

constexpr int kLanes = 16;    // output channels per block
constexpr int kMaxRows = 8;   // rows of x per register tile (3 * kMaxRows accumulators)

struct QuantProblem {
  int64_t M, N, K, G, groups, block_bytes;
  int bits;
  const uint8_t* qweight;
  const void* scales;
  const void* offsets;  // nullptr: none
  const uint16_t* x;    // bf16 bits, [M, K]
  const float* xsum;    // [M, groups], sums of the bf16-rounded x
  void* out;            // [M, N], out_dtype
  at::ScalarType out_dtype;
};

inline float bf16_bits_to_f32(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// q[16 nb + j, k] from block nb's bytes (the packed layout above).
inline int quant_value(const QuantProblem& p, const uint8_t* qw, int64_t k, int j) {
  if (p.bits == 4) {
    const uint8_t byte = qw[(k / 4) * 32 + 2 * j + (k % 2)];
    return (k % 4) < 2 ? (byte & 15) : (byte >> 4);
  }
  return static_cast<int8_t>(qw[(k / 2) * 32 + 2 * j + (k % 2)]);
}

// Checks the packed weight against n, K and the format; fills everything of the problem but x.
QuantProblem weight_problem(const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& offsets, int64_t n, int64_t K, int64_t bits,
                            int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(bits == 8 || offsets.has_value(), "int4 weights need offsets");
  const int64_t G = group_size;
  TORCH_CHECK(G % 4 == 0 && K % G == 0, "group size must divide K and be a multiple of 4");
  const int64_t blocks = (n + kLanes - 1) / kLanes, groups = K / G;
  const int64_t block_bytes = bits == 4 ? K * kLanes / 2 : K * kLanes;
  TORCH_CHECK(qweight.device().is_cpu() && qweight.is_contiguous() && qweight.numel() == blocks * block_bytes,
              "qweight does not match n and K");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == blocks * groups * kLanes, "scales do not match n, K, G");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "scales must be fp16 or fp32");
  if (offsets) {
    TORCH_CHECK(offsets->is_contiguous() && offsets->sizes() == scales.sizes() &&
                    offsets->scalar_type() == scales.scalar_type(),
                "offsets must match scales");
  }
  return QuantProblem{0, n, K, G, groups, block_bytes, int(bits), static_cast<const uint8_t*>(qweight.data_ptr()),
                      scales.data_ptr(), offsets ? offsets->data_ptr() : nullptr, nullptr, nullptr, nullptr,
                      at::kBFloat16};
}

inline void store_row(const QuantProblem& p, int64_t m, int64_t n0, int lanes, const float* v) {
  const int64_t at = m * p.N + n0;
  switch (p.out_dtype) {
    case at::kFloat: std::memcpy(static_cast<float*>(p.out) + at, v, lanes * sizeof(float)); break;
    case at::kBFloat16:
      for (int j = 0; j < lanes; ++j) static_cast<c10::BFloat16*>(p.out)[at + j] = c10::BFloat16(v[j]);
      break;
    default:
      for (int j = 0; j < lanes; ++j) static_cast<c10::Half*>(p.out)[at + j] = c10::Half(v[j]);
  }
}

// ----- portable path: the same arithmetic, one scalar at a time ---------------------------------

template <typename S>
void block_portable(const QuantProblem& p, int64_t nb) {
  const uint8_t* qw = p.qweight + nb * p.block_bytes;
  const S* sc = static_cast<const S*>(p.scales) + nb * p.groups * kLanes;
  const S* of = p.offsets ? static_cast<const S*>(p.offsets) + nb * p.groups * kLanes : nullptr;
  const int lanes = int(std::min<int64_t>(kLanes, p.N - nb * kLanes));
  float row[kLanes];
  for (int64_t m = 0; m < p.M; ++m) {
    const uint16_t* x = p.x + m * p.K;
    for (int j = 0; j < lanes; ++j) {
      float acc = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        float t = 0.f;
        for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) {
          t += float(quant_value(p, qw, k, j)) * bf16_bits_to_f32(x[k]);
        }
        acc += to_f32(sc[g * kLanes + j]) * t;
        if (of) acc += to_f32(of[g * kLanes + j]) * p.xsum[m * p.groups + g];
      }
      row[j] = acc;
    }
    store_row(p, m, nb * kLanes, lanes, row);
  }
}

// ----- vector path --------------------------------------------------------------------------------

#if RADIXRT_HAVE_BF16_DOT
// Chunk c of a block as two registers of bf16 weights, for the input pairs 2c and 2c + 1.
template <int BITS>
inline void load_chunk(const uint8_t* qw, int64_t c, __m512i& lo, __m512i& hi) {
  if constexpr (BITS == 4) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + c * 32)));
    const __m512i bf16_128 = _mm512_set1_epi16(0x4300);
    lo = _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(0x000F), bf16_128, 0xEA);  // (w & 15) | 128.0
    hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), bf16_128);                       // (w >> 4) | 128.0
  } else {
    auto widen = [](const uint8_t* b) {
      const __m128i* v = reinterpret_cast<const __m128i*>(b);
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v)));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v + 1)));
      return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(z, a));  // a -> lanes 0..15, z -> 16..31
    };
    lo = widen(qw + c * 64);
    hi = widen(qw + c * 64 + 32);
  }
}

inline __m512 dot_pair(__m512 acc, __m512i w, int32_t x_pair) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(_mm512_set1_epi32(x_pair)));
}

// Rows [m0, m0 + R) of x against block nb: R x 16 outputs. The weights stream from memory in
// order; prefetching 8 KB ahead (about two blocks) made a whole decode step's GEMMs (distinct
// weights, as in a real step) 1.2-1.3x faster than the hardware prefetcher alone, at M = 1 and 8.
template <int BITS, typename S, bool OFFSETS, int R>
void block_tile(const QuantProblem& p, int64_t nb, int64_t m0) {
  constexpr int64_t kChunkBytes = BITS == 4 ? 32 : 64, kPrefetchAhead = 8192;
  const uint8_t* qw = p.qweight + nb * p.block_bytes;
  const S* sc = static_cast<const S*>(p.scales) + nb * p.groups * kLanes;
  const S* of = OFFSETS ? static_cast<const S*>(p.offsets) + nb * p.groups * kLanes : nullptr;
  const int32_t* x[R];  // bf16 pairs
  const float* xs[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    x[r] = reinterpret_cast<const int32_t*>(p.x + (m0 + r) * p.K);
    xs[r] = p.xsum + (m0 + r) * p.groups;
  }
  __m512 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t chunks = p.G / 4;
  for (int64_t g = 0; g < p.groups; ++g) {
    // Per row one sum for the low and one for the high weights of a chunk, whatever R is: a row's
    // result must not depend on how many rows share its tile, or a speculative verify step (many
    // rows) and a plain decode step (one) round differently, and greedy outputs part. (Two more
    // chains at R = 1 to hide vdpbf16ps's latency measured no faster: a decode is memory-bound.)
    __m512 t[R], u[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) t[r] = u[r] = _mm512_setzero_ps();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      __m512i lo, hi;
      _mm_prefetch(reinterpret_cast<const char*>(qw + c * kChunkBytes) + kPrefetchAhead, _MM_HINT_T0);
      load_chunk<BITS>(qw, c, lo, hi);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        t[r] = dot_pair(t[r], lo, x[r][2 * c]);
        u[r] = dot_pair(u[r], hi, x[r][2 * c + 1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) t[r] = _mm512_add_ps(t[r], u[r]);
    const __m512 s = load16(sc + g * kLanes);
    if constexpr (BITS == 4 || OFFSETS) {
      __m512 coef = OFFSETS ? load16(of + g * kLanes) : _mm512_setzero_ps();
      if constexpr (BITS == 4) coef = _mm512_fnmadd_ps(s, _mm512_set1_ps(128.f), coef);  // o - 128 s
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(t[r], s, acc[r]);
        acc[r] = _mm512_fmadd_ps(coef, _mm512_set1_ps(xs[r][g]), acc[r]);
      }
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(t[r], s, acc[r]);
    }
  }
  const int lanes = int(std::min<int64_t>(kLanes, p.N - nb * kLanes));
  const __mmask16 mask = lanes == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1);
  for (int r = 0; r < R; ++r) {
    const int64_t at = (m0 + r) * p.N + nb * kLanes;
    if (p.out_dtype == at::kFloat) {
      _mm512_mask_storeu_ps(static_cast<float*>(p.out) + at, mask, acc[r]);
    } else if (p.out_dtype == at::kBFloat16) {
      _mm256_mask_storeu_epi16(static_cast<c10::BFloat16*>(p.out) + at, mask,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[r])));
    } else {
      _mm256_mask_storeu_epi16(static_cast<c10::Half*>(p.out) + at, mask,
                               _mm512_cvtps_ph(acc[r], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

template <int BITS, typename S, bool OFFSETS>
void block_simd(const QuantProblem& p, int64_t nb) {
  for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, p.M - m0)) {
      case 1: block_tile<BITS, S, OFFSETS, 1>(p, nb, m0); break;
      case 2: block_tile<BITS, S, OFFSETS, 2>(p, nb, m0); break;
      case 3: block_tile<BITS, S, OFFSETS, 3>(p, nb, m0); break;
      case 4: block_tile<BITS, S, OFFSETS, 4>(p, nb, m0); break;
      case 5: block_tile<BITS, S, OFFSETS, 5>(p, nb, m0); break;
      case 6: block_tile<BITS, S, OFFSETS, 6>(p, nb, m0); break;
      case 7: block_tile<BITS, S, OFFSETS, 7>(p, nb, m0); break;
      default: block_tile<BITS, S, OFFSETS, 8>(p, nb, m0); break;
    }
  }
}
#endif

template <typename S>
void run_blocks(const QuantProblem& p, int64_t nb0, int64_t nb1, bool simd) {
#if RADIXRT_HAVE_BF16_DOT
  if (simd) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      if (p.bits == 4) block_simd<4, S, true>(p, nb);
      else if (p.offsets) block_simd<8, S, true>(p, nb);
      else block_simd<8, S, false>(p, nb);
    }
    return;
  }
#endif
  for (int64_t nb = nb0; nb < nb1; ++nb) block_portable<S>(p, nb);
}

// ----- dequantize into W^T, for the large-batch path (then a bf16 GEMM) -------------------------------

constexpr int kDequantTile = 8;  // blocks written side by side: 256 contiguous bytes per row of W^T

// Blocks [nb0, nb1) of the weight as rows k of wt (bf16, row stride ld, column 0 = channel c0):
// lanes are channels, so each block's row segment is one 32-byte store, and a tile of blocks
// fills 256 contiguous bytes per row.
template <typename S>
void dequantize_blocks(const QuantProblem& p, int64_t nb0, int64_t nb1, c10::BFloat16* wt, int64_t ld, int64_t c0,
                       bool simd) {
  const int per_load = p.bits == 4 ? 4 : 2;  // inputs covered by one 32-byte chunk
  for (int64_t t0 = nb0; t0 < nb1; t0 += kDequantTile) {
    const int64_t t1 = std::min<int64_t>(nb1, t0 + kDequantTile);
    for (int64_t k0 = 0; k0 < p.K; k0 += per_load) {
      const int64_t g = k0 / p.G;
      for (int64_t nb = t0; nb < t1; ++nb) {
        const uint8_t* qw = p.qweight + nb * p.block_bytes;
        const S* sc = static_cast<const S*>(p.scales) + (nb * p.groups + g) * kLanes;
        const S* of = p.offsets ? static_cast<const S*>(p.offsets) + (nb * p.groups + g) * kLanes : nullptr;
        const int lanes = int(std::min<int64_t>(kLanes, p.N - nb * kLanes));
        c10::BFloat16* dst = wt + k0 * ld + nb * kLanes - c0;
#if RADIXRT_HAVE_BF16_DOT
        if (simd) {
          const __mmask16 mask = lanes == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1);
          const __m512 s = load16(sc), o = of ? load16(of) : _mm512_setzero_ps();
          // dword j = channel j's two bytes of the chunk (2j, 2j+1)
          const __m512i w =
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + k0 / per_load * 32)));
          __m512i q[4];
          if (p.bits == 4) {
            const __m512i nib = _mm512_set1_epi32(15);
            q[0] = _mm512_and_si512(w, nib);                        // k0:     low nibble of byte 2j
            q[1] = _mm512_and_si512(_mm512_srli_epi32(w, 8), nib);  // k0 + 1: low nibble of byte 2j+1
            q[2] = _mm512_and_si512(_mm512_srli_epi32(w, 4), nib);  // k0 + 2: high nibble of byte 2j
            q[3] = _mm512_srli_epi32(w, 12);                        // k0 + 3: high nibble of byte 2j+1
          } else {
            q[0] = _mm512_srai_epi32(_mm512_slli_epi32(w, 24), 24);  // k0:     byte 2j, sign-extended
            q[1] = _mm512_srai_epi32(_mm512_slli_epi32(w, 16), 24);  // k0 + 1: byte 2j+1
          }
          for (int i = 0; i < per_load; ++i) {
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[i]), s, o);
            _mm256_mask_storeu_epi16(dst + i * ld, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
          }
          continue;
        }
#endif
        for (int i = 0; i < per_load; ++i)
          for (int j = 0; j < lanes; ++j) {
            float v = to_f32(sc[j]) * float(quant_value(p, qw, k0 + i, j));
            if (of) v += to_f32(of[j]);
            dst[i * ld + j] = c10::BFloat16(v);
          }
      }
    }
  }
}

// sums[g] = x[g*G] + x[g*G + 1] + ... + x[g*G + G-1], added in exactly that order whatever the path:
// a different order moves the logits by an ulp, and greedy decoding must not depend on the CPU.
// The vector path gives each of 16 lanes one group and gathers two bf16 per lane per step.
inline void group_sums(const uint16_t* x, int64_t G, int64_t groups, float* sums, bool simd) {
#if RADIXRT_HAVE_AVX512
  if (simd && G % 2 == 0) {
    const __m512i lane_offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(int(G)));
    const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const int lanes = int(std::min<int64_t>(16, groups - g0));
      const __mmask16 mask = lanes == 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1);
      const uint16_t* base = x + g0 * G;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < G; k += 2) {
        // dword of lane j: bf16 k of group g0 + j in the low half, bf16 k + 1 in the high half
        const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask,
                                                         _mm512_add_epi32(lane_offsets, _mm512_set1_epi32(int(k))),
                                                         base, 2);
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_and_si512(pair, high)));
      }
      _mm512_mask_storeu_ps(sums + g0, mask, acc);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) s += bf16_bits_to_f32(x[k]);
    sums[g] = s;
  }
}

// out [M, n] = x [M, K] @ W^T straight from the packed integers.
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, int64_t n, int64_t bits, int64_t group_size,
                        bool simd) {
  const auto out_dtype = x.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "x must be fp32, bf16 or fp16");
  QuantProblem p = weight_problem(qweight, scales, offsets, n, x.size(1), bits, group_size);
  const int64_t M = x.size(0), K = p.K, G = p.G, groups = p.groups;

  // Activations as bf16 (rounded once) and their per-group sums.
  at::Tensor xb = x.to(at::kBFloat16).contiguous();
  std::vector<float> xsum(M * groups);
  const uint16_t* xbits = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) group_sums(xbits + m * K, G, groups, xsum.data() + m * groups, simd);
  });
  at::Tensor out = at::empty({M, n}, x.options());
  p.M = M;
  p.x = xbits;
  p.xsum = xsum.data();
  p.out = out.data_ptr();
  p.out_dtype = out_dtype;
  // Enough blocks per task that a thread's share outweighs waking it (~64K multiply-adds).
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kLanes * K * M));
  const bool half = scales.scalar_type() == at::kHalf;
  at::parallel_for(0, blocks, grain, [&](int64_t nb0, int64_t nb1) {
    if (half) run_blocks<c10::Half>(p, nb0, nb1, simd);
    else run_blocks<float>(p, nb0, nb1, simd);
  });
  return out;
}

// Many rows: the weight dequantized to bf16 (a tile of channels at a time when it is larger than
// kDequantBytes), then torch's bf16 GEMM.
constexpr int64_t kDequantBytes = 8 << 20;

at::Tensor dequantize_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& offsets, int64_t n, int64_t bits, int64_t group_size,
                             bool simd) {
  const QuantProblem p = weight_problem(qweight, scales, offsets, n, x.size(1), bits, group_size);
  const at::Tensor xb = x.to(at::kBFloat16);
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  const int64_t tile = std::min(padded, std::max<int64_t>(kLanes, kDequantBytes / 2 / p.K / kLanes * kLanes));
  at::Tensor wt = at::empty({p.K, tile}, qweight.options().dtype(at::kBFloat16));
  c10::BFloat16* buffer = wt.data_ptr<c10::BFloat16>();
  const bool half = scales.scalar_type() == at::kHalf;
  auto dequantize = [&](int64_t c0, int64_t width) {
    at::parallel_for(c0 / kLanes, (c0 + width + kLanes - 1) / kLanes, 1, [&](int64_t nb0, int64_t nb1) {
      if (half) dequantize_blocks<c10::Half>(p, nb0, nb1, buffer, tile, c0, simd);
      else dequantize_blocks<float>(p, nb0, nb1, buffer, tile, c0, simd);
    });
  };
  if (tile >= n) {  // one tile: the GEMM writes the output itself
    dequantize(0, n);
    return at::mm(xb, wt.narrow(1, 0, n)).to(x.scalar_type());
  }
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  for (int64_t c0 = 0; c0 < n; c0 += tile) {
    const int64_t width = std::min(tile, n - c0);
    dequantize(c0, width);
    out.narrow(1, c0, width).copy_(at::mm(xb, wt.narrow(1, 0, width)));
  }
  return out;
}

// Row `n` of the float weight into `out` [K]: w = s * q + o in float32, the product rounded before the
// sum as QuantizedTensor.dequantize rounds it (the volatile stops a compiler from fusing the two into
// one FMA, which rounds once: with float32 scales the product is not exact).
template <typename S, typename T>
void dequantize_row(const QuantProblem& p, int64_t n, T* out) {
  const uint8_t* qw = p.qweight + (n / kLanes) * p.block_bytes;
  const int j = int(n % kLanes);
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t at = ((n / kLanes) * p.groups + k / p.G) * kLanes + j;
    volatile float product = to_f32(static_cast<const S*>(p.scales)[at]) * float(quant_value(p, qw, k, j));
    float v = product;
    if (p.offsets) v += to_f32(static_cast<const S*>(p.offsets)[at]);
    out[k] = static_cast<T>(v);
  }
}

}  // namespace

at::Tensor quant_rows(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                      int64_t n, int64_t K, int64_t bits, int64_t group_size, const at::Tensor& rows,
                      at::ScalarType dtype) {
  const QuantProblem p = weight_problem(qweight, scales, offsets, n, K, bits, group_size);
  TORCH_CHECK(!at::isFloatingType(rows.scalar_type()) && rows.device().is_cpu(), "rows must be CPU integers");
  const at::Tensor ids = rows.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) TORCH_CHECK(id[i] >= 0 && id[i] < n, "row ", id[i], " is out of range");
  std::vector<int64_t> sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor out = at::empty(sizes, qweight.options().dtype(dtype));
  const bool half = scales.scalar_type() == at::kHalf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "quant_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, ids.numel(), 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (half) dequantize_row<c10::Half>(p, id[i], o + i * K);
        else dequantize_row<float>(p, id[i], o + i * K);
      }
    });
  });
  return out;
}

bool quant_has_simd() { return RADIXRT_HAVE_BF16_DOT; }

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias, int64_t n,
                        int64_t bits, int64_t group_size, int64_t dequantize_min_rows, bool simd) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "x must be a CPU tensor");
  const int64_t K = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, K});
  at::Tensor out;
  if (x2.size(0) == 0) {  // no rows (a prefill chunk whose logits nobody needs): nothing to compute
    out = at::empty({0, n}, x.options());
  } else if (x2.size(0) >= dequantize_min_rows) {
    out = dequantize_matmul(x2, qweight, scales, offsets, n, bits, group_size, simd);
  } else {
    out = quant_matmul(x2, qweight, scales, offsets, n, bits, group_size, simd);
  }
  if (bias) out.add_(*bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  return out.view(sizes);
}

}  // namespace radixrt
