// The decoder layers of a step in one call: no Python and a handful of ATen calls per layer.
//
// At batch 1 a step reads every weight once, and everything around the matmuls (norms, rotary,
// casts, the KV write, residual adds, the activation, and the Python that calls them: ~70 small ops
// per layer) used to cost more than the weight reads themselves. Here each layer is
//
//     h = rms_norm(x)                        (x: the residual stream, model dtype)
//     q, k, v = split(qkv(h))                rotary on q and k (neox halves, float32 math);
//                                            q/k RMSNorm per head first where the family has it
//     store k, v in their page slots         csrc/kv_store.cpp
//     a = paged_attention(q, pages)          csrc/paged_attention.cpp (window, soft cap, scale)
//     x = x + o(a);  h = rms_norm(x)
//     x = x + down(act(gate(h)) * up(h))     gate and up fused in one matmul
//
// with the same roundings as radixrt/model/llama.py (every op rounds to the model dtype where
// torch's would), so greedy outputs match the eager forward; the matmuls are the same ATen calls
// (or csrc/quant_linear.cpp for packed int4/int8 weights). Rows are the step's flat token axis
// (prefill chunks and decode tokens together), [T, hidden].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "decoder.h"
#include "simd.h"

namespace radixrt {

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& qo_indptr, const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                     const at::Tensor& kv_lens, at::Tensor& out, double scale, bool simd, int64_t window_left,
                     double softcap);
void store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const at::Tensor& slots);
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias, int64_t n,
                        int64_t bits, int64_t group_size, int64_t dequantize_min_rows, bool simd);

namespace {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

// out[r] = w * round(x[r] / rms(x[r])), per row of `dim` (Llama's RMSNorm: float32 statistics,
// cast back to the model dtype, then times the weight in the model dtype).
template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, int64_t rows, int64_t dim,
                   float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * x_stride;
      T* o = out + r * out_stride;
      float ss = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / dim + eps);
      for (int64_t i = 0; i < dim; ++i) {
        const float normed = static_cast<float>(round_to<T>(static_cast<float>(xr[i]) * inv));
        o[i] = round_to<T>(static_cast<float>(w[i]) * normed);
      }
    }
  });
}

// x += delta, rounding each sum to the model dtype (torch's `x + delta`).
template <typename T>
void add_into(T* x, const T* delta, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) x[i] = round_to<T>(static_cast<float>(x[i]) + static_cast<float>(delta[i]));
  });
}

// Rotate the first 2 * half features of each head (neox halves), from `src` into `dst`
// ([T, heads, D], dst contiguous); features past 2 * half are copied (partial rotary).
template <typename T>
void rotary(const T* src, int64_t src_token_stride, T* dst, int64_t tokens, int64_t heads, int64_t dim,
            const float* cos, const float* sin, int64_t half) {
  at::parallel_for(0, tokens, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const T* x = src + t * src_token_stride + h * dim;
        T* o = dst + (t * heads + h) * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          o[i] = round_to<T>(x1 * c[i] - x2 * s[i]);
          o[i + half] = round_to<T>(x2 * c[i] + x1 * s[i]);
        }
        for (int64_t i = 2 * half; i < dim; ++i) o[i] = x[i];
      }
    }
  });
}

inline float gated_act_one(float g, bool gelu_tanh) {
  if (gelu_tanh) return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
  return g / (1.f + std::exp(-g));
}

#if RADIXRT_HAVE_AVX512
// The same with exp16 (relative error ~2e-7): silu(g) = g / (1 + e^-g); gelu_tanh(g) = g - g / (e^2y + 1),
// y = sqrt(2/pi) (g + 0.044715 g^3), which is 0.5 g (1 + tanh y). exp16 clamps at 88, so both ends saturate.
inline __m512 gated_act16(__m512 g, bool gelu_tanh) {
  const __m512 one = _mm512_set1_ps(1.f);
  if (gelu_tanh) {
    __m512 y = _mm512_mul_ps(_mm512_set1_ps(2 * 0.7978845608028654f),
                             _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g), g));
    return _mm512_sub_ps(g, _mm512_div_ps(g, _mm512_add_ps(exp16(y), one)));
  }
  return _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
#endif

// out[t, i] = round(round(act(gate[t, i])) * up[t, i]), gate_up = [gate | up] per row. Tasks are
// chunks of a row, so the inner loop runs over contiguous columns (16 at a time with AVX-512): the
// element-wise form with a division per element and scalar exp cost 4 ms of a 27 ms batch-32 step.
template <typename T>
void gated_act(const T* gate_up, T* out, int64_t tokens, int64_t inter, bool gelu_tanh, bool simd) {
  constexpr int64_t kChunk = 512;
  const int64_t chunks = (inter + kChunk - 1) / kChunk;
  at::parallel_for(0, tokens * chunks, 4, [&](int64_t c0, int64_t c1) {
    float act[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t = c / chunks, j0 = (c % chunks) * kChunk, n = std::min(kChunk, inter - j0);
      const T* gate = gate_up + t * 2 * inter + j0;
      const T* up = gate + inter;
      int64_t j = 0;
#if RADIXRT_HAVE_AVX512
      if (simd)
        for (; j + 16 <= n; j += 16) _mm512_storeu_ps(act + j, gated_act16(load16(gate + j), gelu_tanh));
#endif
      for (; j < n; ++j) act[j] = gated_act_one(static_cast<float>(gate[j]), gelu_tanh);
      T* o = out + t * inter + j0;
      for (j = 0; j < n; ++j) o[j] = round_to<T>(static_cast<float>(round_to<T>(act[j])) * static_cast<float>(up[j]));
    }
  });
}

template <typename T>
at::Tensor layer_forward(const Decoder& d, const DecoderLayer& l, at::Tensor x, const StepInputs& in,
                         const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t T_ = x.size(0), H = x.size(1);
  const int64_t q_size = d.num_heads * d.head_dim, kv_size = d.num_kv_heads * d.head_dim;
  T* xd = x.data_ptr<T>();
  at::Tensor h = at::empty_like(x);
  rms_norm_rows<T>(xd, H, l.input_norm.data_ptr<T>(), h.data_ptr<T>(), H, T_, H, d.eps);

  at::Tensor qkv = l.qkv(h);  // [T, q + 2 kv]
  const int64_t row = qkv.stride(0);
  T* qkv_d = qkv.data_ptr<T>();
  if (l.q_norm.defined()) {  // per-head RMSNorm of q and k, in place (Qwen3)
    for (int64_t t = 0; t < T_; ++t) {
      rms_norm_rows<T>(qkv_d + t * row, d.head_dim, l.q_norm.data_ptr<T>(), qkv_d + t * row, d.head_dim, d.num_heads,
                       d.head_dim, d.eps);
      rms_norm_rows<T>(qkv_d + t * row + q_size, d.head_dim, l.k_norm.data_ptr<T>(), qkv_d + t * row + q_size,
                       d.head_dim, d.num_kv_heads, d.head_dim, d.eps);
    }
  }
  at::Tensor q = at::empty({T_, d.num_heads, d.head_dim}, x.options());
  at::Tensor k = at::empty({T_, d.num_kv_heads, d.head_dim}, x.options());
  const int64_t half = in.cos[l.rope].size(1);
  const float* cos = in.cos[l.rope].data_ptr<float>();
  const float* sin = in.sin[l.rope].data_ptr<float>();
  rotary<T>(qkv_d, row, q.data_ptr<T>(), T_, d.num_heads, d.head_dim, cos, sin, half);
  rotary<T>(qkv_d + q_size, row, k.data_ptr<T>(), T_, d.num_kv_heads, d.head_dim, cos, sin, half);
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T_, d.num_kv_heads, d.head_dim});
  store_kv(k, v, k_cache, v_cache, in.slots);
  at::Tensor attn = at::empty_like(q);
  paged_attention(q, k_cache, v_cache, in.qo_indptr, in.kv_indptr, in.kv_indices, in.kv_lens, attn, l.scale, d.simd,
                  l.window_left, l.softcap);

  at::Tensor o = l.o(attn.view({T_, q_size}));
  add_into<T>(xd, o.data_ptr<T>(), T_ * H);
  rms_norm_rows<T>(xd, H, l.post_norm.data_ptr<T>(), h.data_ptr<T>(), H, T_, H, d.eps);
  at::Tensor gate_up = l.gate_up(h);
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({T_, inter}, x.options());
  gated_act<T>(gate_up.data_ptr<T>(), act.data_ptr<T>(), T_, inter, d.gelu_tanh, d.simd);
  at::Tensor down = l.down(act);
  add_into<T>(xd, down.data_ptr<T>(), T_ * H);
  return x;
}

template <typename T>
at::Tensor forward_typed(const Decoder& d, at::Tensor x, const StepInputs& in) {
  for (size_t i = 0; i < d.layers.size(); ++i) x = layer_forward<T>(d, d.layers[i], x, in, d.k_caches[i], d.v_caches[i]);
  at::Tensor rows = x.index_select(0, in.logits_indices);
  at::Tensor out = at::empty_like(rows);
  const int64_t H = x.size(1);
  rms_norm_rows<T>(rows.data_ptr<T>(), H, d.final_norm.data_ptr<T>(), out.data_ptr<T>(), H, rows.size(0), H, d.eps);
  return out;
}

}  // namespace

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (weight.defined()) return at::linear(x, weight, bias);
  return quant_linear(x, qweight, scales, offsets, bias, n, bits, group_size, dequantize_min_rows, simd);
}

at::Tensor Decoder::forward(const at::Tensor& embeddings, const StepInputs& in) const {
  TORCH_CHECK(embeddings.dim() == 2 && embeddings.is_contiguous(), "embeddings: [T, hidden] contiguous");
  TORCH_CHECK(in.cos.size() == in.sin.size(), "one sin per cos");
  for (size_t i = 0; i < in.cos.size(); ++i)
    TORCH_CHECK(in.cos[i].scalar_type() == at::kFloat && in.cos[i].is_contiguous() && in.sin[i].is_contiguous() &&
                    in.cos[i].size(0) == embeddings.size(0),
                "cos, sin: [T, rotary_dim / 2] float32, contiguous");
  for (const DecoderLayer& l : layers)
    TORCH_CHECK(l.rope >= 0 && size_t(l.rope) < in.cos.size(), "a layer's rope index is out of range");
  at::Tensor x = embeddings.clone();  // the residual stream, updated in place layer by layer
  switch (x.scalar_type()) {
    case at::kFloat:
      return forward_typed<float>(*this, x, in);
    case at::kBFloat16:
      return forward_typed<c10::BFloat16>(*this, x, in);
    case at::kHalf:
      return forward_typed<c10::Half>(*this, x, in);
    default:
      TORCH_CHECK(false, "the fused decoder supports float32, bfloat16 and float16, not ", x.scalar_type());
  }
}

}  // namespace radixrt
