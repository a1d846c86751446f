// Python bindings of the radixrt CPU kernels (built by radixrt/_native.py).

#include <torch/extension.h>

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
bool quant_has_simd();
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
  m.attr("quant_has_simd") = radixrt::quant_has_simd();
  m.attr("has_avx512") = bool(
#if defined(__AVX512F__) && defined(__AVX512BW__)
      true
#else
      false
#endif
  );
}
