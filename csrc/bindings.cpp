// pybind11 module dpfast._C.
//
// The boundary is deliberately torch-free: tensors arrive as raw addresses (tensor.data_ptr()),
// element counts and a CUDA stream handle (torch.cuda.Stream.cuda_stream). The module therefore
// does not link libtorch and one build works with any torch version. The Python wrapper
// (dpfast/finalize.py) checks dtype, contiguity and devices; this file checks everything it is
// handed and raises ValueError naming the argument (std::invalid_argument maps to ValueError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "chacha20.h"
#include "philox.h"

#ifndef DPFAST_VERSION
#define DPFAST_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace {

using dpfast::TensorSlice;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("dpfast._C: " + msg); }

// seed and step come in as Python integers (anything with __index__) so that -1 or 2**64 is a
// ValueError naming the argument rather than a TypeError or a silently wrapped key.
uint64_t to_u64(const py::handle& v, const char* name, unsigned long long limit) {
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!idx) {
    PyErr_Clear();
    bad(std::string(name) + " must be an integer, got " + std::string(py::repr(v)));
  }
  const unsigned long long x = PyLong_AsUnsignedLongLong(idx.ptr());
  if ((x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) || (limit && x >= limit)) {
    PyErr_Clear();
    bad(std::string(name) + " must be in [0, " + (limit ? "2**32" : "2**64") + "), got " +
        std::string(py::repr(v)));
  }
  return x;
}
uint64_t to_seed(const py::handle& seed) { return to_u64(seed, "seed", 0); }
uint32_t to_step(const py::handle& step) {
  return static_cast<uint32_t>(to_u64(step, "step", 1ull << 32));
}

void check_count(int64_t n, const char* name) {
  if (n < 0) bad(std::string(name) + " must be >= 0, got " + std::to_string(n));
}

void check_ptr(uintptr_t ptr, int64_t n, const std::string& name) {
  if (n > 0 && ptr == 0) bad(name + " is a null pointer for " + std::to_string(n) + " elements");
}

void check_real(double v, const char* name, bool nonnegative) {
  if (!std::isfinite(v) || (nonnegative && v < 0)) {
    bad(std::string(name) + " must be a finite" + (nonnegative ? " non-negative" : "") +
        " number, got " + std::to_string(v));
  }
}

std::vector<TensorSlice> make_slices(const std::vector<uintptr_t>& acc_ptrs,
                                     const std::vector<uintptr_t>& out_ptrs,
                                     const std::vector<int64_t>& numels,
                                     const std::vector<int64_t>& offsets) {
  const size_t n = acc_ptrs.size();
  if (out_ptrs.size() != n || numels.size() != n || offsets.size() != n) {
    bad("acc_ptrs, out_ptrs, numels and offsets must have equal lengths, got " +
        std::to_string(n) + ", " + std::to_string(out_ptrs.size()) + ", " +
        std::to_string(numels.size()) + ", " + std::to_string(offsets.size()));
  }
  std::vector<TensorSlice> slices(n);
  for (size_t p = 0; p < n; ++p) {
    const std::string at = "[" + std::to_string(p) + "]";
    if (numels[p] < 0) bad("numels" + at + " must be >= 0, got " + std::to_string(numels[p]));
    if (offsets[p] < 0) bad("offsets" + at + " must be >= 0, got " + std::to_string(offsets[p]));
    if (offsets[p] > std::numeric_limits<int64_t>::max() - numels[p]) {
      bad("offsets" + at + " + numels" + at + " overflows int64");
    }
    check_ptr(acc_ptrs[p], numels[p], "acc_ptrs" + at);
    check_ptr(out_ptrs[p], numels[p], "out_ptrs" + at);
    slices[p] = TensorSlice{reinterpret_cast<const float*>(acc_ptrs[p]),
                            reinterpret_cast<float*>(out_ptrs[p]), numels[p],
                            static_cast<uint64_t>(offsets[p])};
  }
  return slices;
}

void finalize_cpu_py(const std::vector<uintptr_t>& acc_ptrs, const std::vector<uintptr_t>& out_ptrs,
                     const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
                     double noise_std, double scale, const py::object& seed, const py::object& step) {
  check_real(noise_std, "noise_std", true);
  check_real(scale, "scale", false);
  const auto slices = make_slices(acc_ptrs, out_ptrs, numels, offsets);
  const uint64_t s = to_seed(seed);
  const uint32_t k = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_cpu(slices.data(), slices.size(), noise_std, scale, s, k);
}

void normal_cpu_py(uintptr_t out_ptr, int64_t n, int64_t offset, const py::object& seed,
                   const py::object& step) {
  check_count(n, "n");
  check_count(offset, "offset");
  check_ptr(out_ptr, n, "out_ptr");
  const TensorSlice t{nullptr, reinterpret_cast<float*>(out_ptr), n, static_cast<uint64_t>(offset)};
  const uint64_t s = to_seed(seed);
  const uint32_t k = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_cpu(&t, 1, 1.0, 1.0, s, k);
}

void poisson_uniforms_cpu_py(uintptr_t out_ptr, uintptr_t indices_ptr, int64_t n,
                             const py::object& seed, const py::object& step) {
  check_count(n, "n");
  check_ptr(out_ptr, n, "out_ptr");
  check_ptr(indices_ptr, n, "indices_ptr");
  const uint64_t s = to_seed(seed);
  const uint32_t k = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::poisson_uniforms_cpu(reinterpret_cast<double*>(out_ptr),
                               reinterpret_cast<const int64_t*>(indices_ptr), n, s, k);
}

// ---- Secure mode (chacha20.h) -------------------------------------------------------------------

dpfast::ChaChaKey to_key(const py::bytes& key) {
  const std::string k = key;
  if (k.size() != 32) bad("key must be 32 bytes, got " + std::to_string(k.size()));
  dpfast::ChaChaKey out;
  for (int i = 0; i < 8; ++i) {  // little-endian words, as RFC 8439
    out.k[i] = 0;
    for (int b = 3; b >= 0; --b) out.k[i] = (out.k[i] << 8) | static_cast<uint8_t>(k[4 * i + b]);
  }
  return out;
}

void check_secure_grid(uint64_t scale_s, int grid_exp) {
  if (scale_s < 1 || scale_s > (uint64_t(1) << dpfast::kSecureMaxScaleBits)) {
    bad("scale_s must be in [1, 2**" + std::to_string(dpfast::kSecureMaxScaleBits) + "], got " +
        std::to_string(scale_s));
  }
  if (grid_exp < -1000 || grid_exp > 1000) {
    bad("grid_exp must be in [-1000, 1000], got " + std::to_string(grid_exp));
  }
}

void finalize_secure_cpu_py(const std::vector<uintptr_t>& acc_ptrs,
                            const std::vector<uintptr_t>& out_ptrs,
                            const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
                            const py::bytes& key, uint64_t scale_s, int grid_exp, double scale,
                            const py::object& step) {
  check_secure_grid(scale_s, grid_exp);
  check_real(scale, "scale", false);
  const auto k = to_key(key);
  const auto slices = make_slices(acc_ptrs, out_ptrs, numels, offsets);
  const uint32_t st = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_secure_cpu(slices.data(), slices.size(), k, scale_s, grid_exp, scale, st);
}

void discrete_gaussian_cpu_py(uintptr_t out_ptr, int64_t n, int64_t offset, const py::bytes& key,
                              uint64_t scale_s, const py::object& step) {
  check_count(n, "n");
  check_count(offset, "offset");
  check_ptr(out_ptr, n, "out_ptr");
  check_secure_grid(scale_s, 0);
  const auto k = to_key(key);
  const uint32_t st = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::discrete_gaussian_cpu(reinterpret_cast<int64_t*>(out_ptr), n,
                                static_cast<uint64_t>(offset), k, scale_s, st);
}

py::tuple chacha20_block_py(const py::bytes& key, uint32_t w12, uint32_t w13, uint32_t w14,
                            uint32_t w15) {
  uint32_t out[16];
  dpfast::chacha20_block(to_key(key), w12, w13, w14, w15, out);
  py::tuple t(16);
  for (int i = 0; i < 16; ++i) t[i] = out[i];
  return t;
}

#if defined(DPFAST_WITH_CUDA)
void finalize_secure_cuda_py(const std::vector<uintptr_t>& acc_ptrs,
                             const std::vector<uintptr_t>& out_ptrs,
                             const std::vector<int64_t>& numels,
                             const std::vector<int64_t>& offsets, const py::bytes& key,
                             uint64_t scale_s, int grid_exp, double scale, const py::object& step,
                             uintptr_t stream) {
  check_secure_grid(scale_s, grid_exp);
  check_real(scale, "scale", false);
  const auto k = to_key(key);
  const auto slices = make_slices(acc_ptrs, out_ptrs, numels, offsets);
  const uint32_t st = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_secure_cuda(slices.data(), slices.size(), k, scale_s, grid_exp, scale, st,
                               stream);
}
#endif

py::tuple philox4x32_py(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                        uint32_t k1) {
  const auto x = dpfast::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(x.x[0], x.x[1], x.x[2], x.x[3]);
}

#if defined(DPFAST_WITH_CUDA)
void finalize_cuda_py(const std::vector<uintptr_t>& acc_ptrs, const std::vector<uintptr_t>& out_ptrs,
                      const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
                      double noise_std, double scale, const py::object& seed, const py::object& step,
                      uintptr_t stream) {
  check_real(noise_std, "noise_std", true);
  check_real(scale, "scale", false);
  const auto slices = make_slices(acc_ptrs, out_ptrs, numels, offsets);
  const uint64_t s = to_seed(seed);
  const uint32_t k = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_cuda(slices.data(), slices.size(), noise_std, scale, s, k, stream);
}

void normal_cuda_py(uintptr_t out_ptr, int64_t n, int64_t offset, const py::object& seed,
                    const py::object& step, uintptr_t stream) {
  check_count(n, "n");
  check_count(offset, "offset");
  check_ptr(out_ptr, n, "out_ptr");
  const TensorSlice t{nullptr, reinterpret_cast<float*>(out_ptr), n, static_cast<uint64_t>(offset)};
  const uint64_t s = to_seed(seed);
  const uint32_t k = to_step(step);
  py::gil_scoped_release nogil;
  dpfast::finalize_cuda(&t, 1, 1.0, 1.0, s, k, stream);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dpfast compiled kernels: fused DP-SGD finalize and the Philox noise stream";
  m.attr("version") = DPFAST_VERSION;
#if defined(DPFAST_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("STREAM_NOISE") = dpfast::kStreamNoise;
  m.attr("STREAM_POISSON") = dpfast::kStreamPoisson;
  m.attr("STREAM_AUX") = dpfast::kStreamAux;

  m.def("finalize_cpu", &finalize_cpu_py, py::arg("acc_ptrs"), py::arg("out_ptrs"),
        py::arg("numels"), py::arg("offsets"), py::arg("noise_std"), py::arg("scale"),
        py::arg("seed"), py::arg("step"),
        "out[j] = (float)((acc[j] + noise_std * z(offset + j)) * scale) for every fp32 tensor "
        "given by address; out may alias acc.");
  m.def("normal_cpu", &normal_cpu_py, py::arg("out_ptr"), py::arg("n"), py::arg("offset"),
        py::arg("seed"), py::arg("step"),
        "Write elements offset .. offset+n-1 of the fp32 noise stream to out_ptr.");
  m.def("poisson_uniforms_cpu", &poisson_uniforms_cpu_py, py::arg("out_ptr"),
        py::arg("indices_ptr"), py::arg("n"), py::arg("seed"), py::arg("step"),
        "out[i] (float64) = Poisson membership uniform of sample indices[i] (int64).");
  m.def("philox4x32", &philox4x32_py, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"), "Philox4x32-10 of one counter (for known-answer tests).");
  m.def("finalize_secure_cpu", &finalize_secure_cpu_py, py::arg("acc_ptrs"), py::arg("out_ptrs"),
        py::arg("numels"), py::arg("offsets"), py::arg("key"), py::arg("scale_s"),
        py::arg("grid_exp"), py::arg("scale"), py::arg("step"),
        "Secure finalize (chacha20.h): out[j] = (float)(((a + k) * 2^grid_exp) * scale), "
        "a = acc[j] on the grid, k ~ N_Z(0, scale_s^2) from ChaCha20 under the 32-byte key.");
  m.def("discrete_gaussian_cpu", &discrete_gaussian_cpu_py, py::arg("out_ptr"), py::arg("n"),
        py::arg("offset"), py::arg("key"), py::arg("scale_s"), py::arg("step"),
        "Write elements offset .. offset+n-1 of the secure integer noise stream (int64).");
  m.def("chacha20_block", &chacha20_block_py, py::arg("key"), py::arg("w12"), py::arg("w13"),
        py::arg("w14"), py::arg("w15"),
        "RFC 8439 ChaCha20 block function with input words 12..15 (for known-answer tests).");
#if defined(DPFAST_WITH_CUDA)
  m.def("finalize_secure_cuda", &finalize_secure_cuda_py, py::arg("acc_ptrs"),
        py::arg("out_ptrs"), py::arg("numels"), py::arg("offsets"), py::arg("key"),
        py::arg("scale_s"), py::arg("grid_exp"), py::arg("scale"), py::arg("step"),
        py::arg("stream"), "CUDA twin of finalize_secure_cpu: one launch on `stream`.");
  m.def("finalize_cuda", &finalize_cuda_py, py::arg("acc_ptrs"), py::arg("out_ptrs"),
        py::arg("numels"), py::arg("offsets"), py::arg("noise_std"), py::arg("scale"),
        py::arg("seed"), py::arg("step"), py::arg("stream"),
        "CUDA twin of finalize_cpu: one launch on `stream` (a cudaStream_t as int) for all "
        "tensors, on the current device.");
  m.def("normal_cuda", &normal_cuda_py, py::arg("out_ptr"), py::arg("n"), py::arg("offset"),
        py::arg("seed"), py::arg("step"), py::arg("stream"),
        "CUDA twin of normal_cpu.");
#endif
}
