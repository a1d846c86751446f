// The fused decoder's data (csrc/decoder.cpp): built once from the model's weights, then one
// `forward` per step. Python builds it in radixrt/model/fused.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace radixrt {

// y = x W^T + b, with W dense ([N, K], `weight`) or packed int4/int8 (csrc/quant_linear.cpp).
struct Linear {
  at::Tensor weight;
  at::Tensor qweight, scales;
  std::optional<at::Tensor> offsets, bias;
  int64_t n = 0, bits = 0, group_size = 0, dequantize_min_rows = 0;
  bool simd = true;
  at::Tensor operator()(const at::Tensor& x) const;
};

struct DecoderLayer {
  at::Tensor input_norm, post_norm;  // RMSNorm weights [hidden]
  at::Tensor q_norm, k_norm;         // per-head RMSNorm weights [head_dim], or undefined
  Linear qkv, o, gate_up, down;
  double scale = 1.0;                // attention softmax scale
  int64_t window_left = -1;          // sliding window (keys before the query it sees); -1: none
  double softcap = 0.0;              // attention logit soft cap; 0: none
  int64_t rope = 0;                  // which of the step's cos/sin tables (one per layer type)
};

// What changes every step: the rope of each token and the step's paged-KV index.
struct StepInputs {
  std::vector<at::Tensor> cos, sin;                      // per layer type: [T, rotary_dim / 2] float32
  at::Tensor slots;                                      // [T] int64: where each token's K/V goes
  at::Tensor qo_indptr, kv_indptr, kv_indices, kv_lens;  // int32 (radixrt/attention/native.py)
  at::Tensor logits_indices;                             // [R] int64: the rows whose hidden state is returned
};

struct Decoder {
  std::vector<DecoderLayer> layers;
  std::vector<at::Tensor> k_caches, v_caches;  // per layer [pages, page_size, kv_heads, head_dim]
  at::Tensor final_norm;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double eps = 1e-6;
  bool gelu_tanh = false;  // the gated MLP's activation: silu, or gelu (tanh approximation)
  bool simd = true;
  // embeddings [T, hidden] -> the final-normed hidden states of the rows in logits_indices [R, hidden].
  at::Tensor forward(const at::Tensor& embeddings, const StepInputs& in) const;
};

}  // namespace radixrt
