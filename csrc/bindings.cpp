// Python bindings of the radixrt CPU kernels (built by radixrt/_native.py).

#include <torch/extension.h>

#include "decoder.h"

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
at::Tensor quant_rows(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                      int64_t n, int64_t K, int64_t bits, int64_t group_size, const at::Tensor& rows,
                      at::ScalarType dtype);
bool quant_has_simd();
at::Tensor argmax_rows(const at::Tensor& logits, bool simd);
}  // namespace radixrt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "radixrt native CPU kernels";
  m.def("paged_attention", &radixrt::paged_attention, "causal attention over paged KV (decode and prefill)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("qo_indptr"), py::arg("kv_indptr"),
        py::arg("kv_indices"), py::arg("kv_lens"), py::arg("out"), py::arg("scale"), py::arg("simd") = true,
        py::arg("window_left") = -1, py::arg("softcap") = 0.0, py::call_guard<py::gil_scoped_release>());
  m.def("store_kv", &radixrt::store_kv, "write new K/V rows into their page slots", py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::call_guard<py::gil_scoped_release>());
  m.def("quant_linear", &radixrt::quant_linear, "x @ W^T + b with W packed int4/int8 (csrc/quant_linear.cpp)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("n"),
        py::arg("bits"), py::arg("group_size"), py::arg("dequantize_min_rows"), py::arg("simd") = true,
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_rows", &radixrt::quant_rows, "rows of a packed int4/int8 weight as floats (an embedding lookup)",
        py::arg("qweight"), py::arg("scales"), py::arg("offsets"), py::arg("n"), py::arg("k"), py::arg("bits"),
        py::arg("group_size"), py::arg("rows"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>());
  m.attr("quant_has_simd") = radixrt::quant_has_simd();
  m.def("argmax_rows", &radixrt::argmax_rows, "[B] first index of each row's largest value (csrc/argmax.cpp)",
        py::arg("logits"), py::arg("simd") = true, py::call_guard<py::gil_scoped_release>());
  py::class_<radixrt::Linear>(m, "Linear", "a dense or packed linear layer of the fused decoder (csrc/decoder.h)")
      .def(py::init<>())
      .def_readwrite("weight", &radixrt::Linear::weight)
      .def_readwrite("qweight", &radixrt::Linear::qweight)
      .def_readwrite("scales", &radixrt::Linear::scales)
      .def_readwrite("offsets", &radixrt::Linear::offsets)
      .def_readwrite("bias", &radixrt::Linear::bias)
      .def_readwrite("n", &radixrt::Linear::n)
      .def_readwrite("bits", &radixrt::Linear::bits)
      .def_readwrite("group_size", &radixrt::Linear::group_size)
      .def_readwrite("dequantize_min_rows", &radixrt::Linear::dequantize_min_rows)
      .def_readwrite("simd", &radixrt::Linear::simd)
      .def("__call__", &radixrt::Linear::operator(), py::call_guard<py::gil_scoped_release>());
  py::class_<radixrt::DecoderLayer>(m, "DecoderLayer")
      .def(py::init<>())
      .def_readwrite("input_norm", &radixrt::DecoderLayer::input_norm)
      .def_readwrite("post_norm", &radixrt::DecoderLayer::post_norm)
      .def_readwrite("q_norm", &radixrt::DecoderLayer::q_norm)
      .def_readwrite("k_norm", &radixrt::DecoderLayer::k_norm)
      .def_readwrite("qkv", &radixrt::DecoderLayer::qkv)
      .def_readwrite("o", &radixrt::DecoderLayer::o)
      .def_readwrite("gate_up", &radixrt::DecoderLayer::gate_up)
      .def_readwrite("down", &radixrt::DecoderLayer::down)
      .def_readwrite("scale", &radixrt::DecoderLayer::scale)
      .def_readwrite("window_left", &radixrt::DecoderLayer::window_left)
      .def_readwrite("softcap", &radixrt::DecoderLayer::softcap)
      .def_readwrite("rope", &radixrt::DecoderLayer::rope);
  py::class_<radixrt::StepInputs>(m, "StepInputs")
      .def(py::init<>())
      .def_readwrite("cos", &radixrt::StepInputs::cos)
      .def_readwrite("sin", &radixrt::StepInputs::sin)
      .def_readwrite("slots", &radixrt::StepInputs::slots)
      .def_readwrite("qo_indptr", &radixrt::StepInputs::qo_indptr)
      .def_readwrite("kv_indptr", &radixrt::StepInputs::kv_indptr)
      .def_readwrite("kv_indices", &radixrt::StepInputs::kv_indices)
      .def_readwrite("kv_lens", &radixrt::StepInputs::kv_lens)
      .def_readwrite("logits_indices", &radixrt::StepInputs::logits_indices);
  py::class_<radixrt::Decoder>(m, "Decoder", "the decoder layers of a step in one call (csrc/decoder.cpp)")
      .def(py::init<>())
      .def_readwrite("layers", &radixrt::Decoder::layers)
      .def_readwrite("k_caches", &radixrt::Decoder::k_caches)
      .def_readwrite("v_caches", &radixrt::Decoder::v_caches)
      .def_readwrite("final_norm", &radixrt::Decoder::final_norm)
      .def_readwrite("num_heads", &radixrt::Decoder::num_heads)
      .def_readwrite("num_kv_heads", &radixrt::Decoder::num_kv_heads)
      .def_readwrite("head_dim", &radixrt::Decoder::head_dim)
      .def_readwrite("eps", &radixrt::Decoder::eps)
      .def_readwrite("gelu_tanh", &radixrt::Decoder::gelu_tanh)
      .def_readwrite("simd", &radixrt::Decoder::simd)
      .def("forward", &radixrt::Decoder::forward, py::arg("embeddings"), py::arg("inputs"),
           py::call_guard<py::gil_scoped_release>());
  m.attr("has_avx512") = bool(
#if defined(__AVX512F__) && defined(__AVX512BW__)
      true
#else
      false
#endif
  );
}
