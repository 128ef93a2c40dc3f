// CUDA fused multi-tensor finalize (see philox.h for the contract).
//
// Every parameter tensor of a step is handled by ONE grid-stride launch. The tensor list travels in
// the kernel parameters (a __grid_constant__ struct, up to kBigCap tensors, ~30 KiB; CUDA >= 12.1 on
// sm_70+ allows 32 KiB) instead of a device array: no host-to-device copy, no allocation, no stream
// synchronisation and no buffer lifetime to manage across streams. Lists longer than kBigCap are
// split into several launches (a model with > 768 trainable tensors).
//
// Work unit = one (tensor, Philox block) pair. A thread finds its tensor by binary search over the
// per-tensor unit prefix sums, generates the block's two normals and writes the elements of that
// block that belong to the tensor, with a float2 load/store when the block is whole and aligned.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "chacha20.h"
#include "philox.h"

namespace dpfast {
namespace {

// 40 bytes of parameters per tensor (TensorSlice + prefix sum).
constexpr int kSmallCap = 96;   // ~3.8 KiB: within the classic 4 KiB limit, the cheapest launch
constexpr int kBigCap = 768;    // ~30 KiB < 32764 B: a Stable Diffusion U-Net (~690) in one launch
constexpr int kThreads = 256;

template <int kCap>
struct TensorList {
  int count;
  uint64_t total_units;
  TensorSlice t[kCap];
  uint64_t unit_start[kCap];  // prefix sums of num_blocks(t[p])
};

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dpfast._C: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Whole block at 8-byte aligned addresses: one float2 load and store instead of two scalars.
__device__ __forceinline__ bool aligned8(const TensorSlice& t, int64_t j0) {
  uintptr_t addr = reinterpret_cast<uintptr_t>(t.out + j0);
  if (t.acc) addr |= reinterpret_cast<uintptr_t>(t.acc + j0);
  return (addr & 7u) == 0;
}

// The tensor that work unit u belongs to: the largest p with unit_start[p] <= u (empty tensors were
// dropped on the host, so unit_start is strictly increasing).
template <int kCap>
__device__ __forceinline__ int tensor_of(const TensorList<kCap>& list, uint64_t u) {
  int lo = 0, hi = list.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (list.unit_start[mid] <= u) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <int kCap, bool kNoise>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const __grid_constant__ TensorList<kCap> list, double noise_std, double scale,
                    uint64_t seed, uint32_t step) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t u = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       u < list.total_units; u += stride) {
    const int lo = tensor_of(list, u);
    const TensorSlice& t = list.t[lo];
    const uint64_t b = first_block(t) + (u - list.unit_start[lo]);
    const int64_t j0 = static_cast<int64_t>(kNormalsPerBlock * b - t.offset);
    if (j0 >= 0 && j0 + kNormalsPerBlock <= t.numel && aligned8(t, j0)) {
      double z[kNormalsPerBlock] = {0.0, 0.0};
      if (kNoise) normal_block(seed, step, b, z);
      float2 a = make_float2(0.f, 0.f);
      if (t.acc) a = *reinterpret_cast<const float2*>(t.acc + j0);
      float2 o;
      o.x = finalize_value(a.x, z[0], noise_std, scale);
      o.y = finalize_value(a.y, z[1], noise_std, scale);
      *reinterpret_cast<float2*>(t.out + j0) = o;
    } else {
      finalize_block<kNoise>(t, b, noise_std, scale, seed, step);
    }
  }
}

// Secure finalize (chacha20.h): work unit = one element (its discrete Gaussian draws a variable
// number of ChaCha20 blocks of its own counter), unit_start holds prefix sums of numel.
template <int kCap>
__global__ void __launch_bounds__(kThreads)
    finalize_secure_kernel(const __grid_constant__ TensorList<kCap> list, const ChaChaKey key,
                           uint64_t scale_s, int grid_exp, double scale, uint32_t step) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t u = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       u < list.total_units; u += stride) {
    const int lo = tensor_of(list, u);
    const TensorSlice& t = list.t[lo];
    const int64_t j = static_cast<int64_t>(u - list.unit_start[lo]);
    const int64_t k = secure_noise(key, step, t.offset + static_cast<uint64_t>(j), scale_s);
    const float a = t.acc ? t.acc[j] : 0.0f;
    t.out[j] = secure_finalize_value(a, k, grid_exp, scale);
  }
}

// A launch's tensor list: work units of each tensor (units(t)) laid end to end.
template <int kCap, typename Units>
TensorList<kCap> make_list(const TensorSlice* tensors, int count, Units units) {
  TensorList<kCap> list;
  list.count = count;
  uint64_t total = 0;
  for (int p = 0; p < count; ++p) {
    list.t[p] = tensors[p];
    list.unit_start[p] = total;
    total += units(tensors[p]);
  }
  list.total_units = total;
  return list;
}

// Grid-stride launches: one thread per unit, at most grid_cap resident blocks.
inline int grid_for(uint64_t units, int grid_cap) {
  const uint64_t want = (units + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<uint64_t>(want, static_cast<uint64_t>(grid_cap)));
}

template <int kCap>
void launch_secure_chunk(const TensorSlice* tensors, int count, const ChaChaKey& key,
                         uint64_t scale_s, int grid_exp, double scale, uint32_t step,
                         cudaStream_t stream, int grid_cap) {
  const auto list = make_list<kCap>(tensors, count, [](const TensorSlice& t) {
    return static_cast<uint64_t>(t.numel);  // one work unit per element
  });
  const int grid = grid_for(list.total_units, grid_cap);
  finalize_secure_kernel<kCap><<<grid, kThreads, 0, stream>>>(list, key, scale_s, grid_exp, scale,
                                                              step);
  check_cuda(cudaGetLastError(), "finalize_secure_kernel launch");
}

int max_resident_blocks() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  return sms * (2048 / kThreads);
}

template <int kCap>
void launch_chunk(const TensorSlice* tensors, int count, double noise_std, double scale,
                  uint64_t seed, uint32_t step, cudaStream_t stream, int grid_cap) {
  const auto list = make_list<kCap>(tensors, count, [](const TensorSlice& t) {
    return num_blocks(t);  // one work unit per Philox block
  });
  const int grid = grid_for(list.total_units, grid_cap);
  if (noise_std == 0.0) {
    finalize_kernel<kCap, false><<<grid, kThreads, 0, stream>>>(list, noise_std, scale, seed, step);
  } else {
    finalize_kernel<kCap, true><<<grid, kThreads, 0, stream>>>(list, noise_std, scale, seed, step);
  }
  check_cuda(cudaGetLastError(), "finalize_kernel launch");
}

}  // namespace

namespace {

// The non-empty tensors in launches of at most kBigCap tensors each; `launch(cap, slices, n)` gets
// std::integral_constant<int, kSmallCap or kBigCap> so that small lists use the small argument struct.
template <typename Launch>
void for_each_chunk(const TensorSlice* tensors, size_t count, Launch&& launch) {
  std::vector<TensorSlice> live;
  live.reserve(count);
  for (size_t p = 0; p < count; ++p) {
    if (tensors[p].numel > 0) live.push_back(tensors[p]);
  }
  for (size_t start = 0; start < live.size(); start += kBigCap) {
    const int n = static_cast<int>(std::min<size_t>(kBigCap, live.size() - start));
    if (n <= kSmallCap) {
      launch(std::integral_constant<int, kSmallCap>{}, live.data() + start, n);
    } else {
      launch(std::integral_constant<int, kBigCap>{}, live.data() + start, n);
    }
  }
}

}  // namespace

void finalize_cuda(const TensorSlice* tensors, size_t count, double noise_std, double scale,
                   uint64_t seed, uint32_t step, uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int grid_cap = max_resident_blocks();
  for_each_chunk(tensors, count, [&](auto cap, const TensorSlice* chunk, int n) {
    launch_chunk<decltype(cap)::value>(chunk, n, noise_std, scale, seed, step, stream, grid_cap);
  });
}

void finalize_secure_cuda(const TensorSlice* tensors, size_t count, const ChaChaKey& key,
                          uint64_t scale_s, int grid_exp, double scale, uint32_t step,
                          uintptr_t stream_handle) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int grid_cap = max_resident_blocks();
  for_each_chunk(tensors, count, [&](auto cap, const TensorSlice* chunk, int n) {
    launch_secure_chunk<decltype(cap)::value>(chunk, n, key, scale_s, grid_exp, scale, step, stream,
                                              grid_cap);
  });
}

}  // namespace dpfast
