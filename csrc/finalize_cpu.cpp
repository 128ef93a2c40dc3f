// CPU twin of the fused multi-tensor finalize (see philox.h for the contract).
//
// One OpenMP parallel region for the whole call; each tensor's Philox blocks are shared out with a
// `nowait` worksharing loop so threads move on to the next tensor without a barrier.
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "chacha20.h"
#include "philox.h"

namespace dpfast {
namespace {

// Below this many Philox blocks the thread start-up costs more than the work.
constexpr uint64_t kMinBlocksForThreads = 1u << 13;

template <bool kNoise>
void finalize_cpu_impl(const TensorSlice* tensors, size_t count, double noise_std, double scale,
                       uint64_t seed, uint32_t step) {
  uint64_t total_blocks = 0;
  for (size_t p = 0; p < count; ++p) {
    if (tensors[p].numel > 0) total_blocks += num_blocks(tensors[p]);
  }
  const bool parallel = total_blocks >= kMinBlocksForThreads;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
#endif
  {
    for (size_t p = 0; p < count; ++p) {
      const TensorSlice t = tensors[p];
      if (t.numel <= 0) continue;
      const uint64_t b0 = first_block(t);
      const int64_t nb = static_cast<int64_t>(num_blocks(t));
#if defined(_OPENMP)
#pragma omp for schedule(static) nowait
#endif
      for (int64_t k = 0; k < nb; ++k) {
        finalize_block<kNoise>(t, b0 + static_cast<uint64_t>(k), noise_std, scale, seed, step);
      }
    }
  }
}

}  // namespace

void finalize_cpu(const TensorSlice* tensors, size_t count, double noise_std, double scale,
                  uint64_t seed, uint32_t step) {
  if (noise_std == 0.0) {
    finalize_cpu_impl<false>(tensors, count, noise_std, scale, seed, step);
  } else {
    finalize_cpu_impl<true>(tensors, count, noise_std, scale, seed, step);
  }
}

void poisson_uniforms_cpu(double* out, const int64_t* indices, int64_t n, uint64_t seed,
                          uint32_t step) {
  const bool parallel = static_cast<uint64_t>(n) >= 4 * kMinBlocksForThreads;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t i = 0; i < n; ++i) {
    // Sample indices are read as uint64, like the reference's astype(np.uint64).
    out[i] = poisson_uniform(seed, step, static_cast<uint64_t>(indices[i]));
  }
}

// Secure finalize: one discrete Gaussian per element; a sample costs ~1-2 us, so threads pay off
// from a few hundred elements. Elements are shared out per tensor with the same nowait loops.
constexpr int64_t kMinSecureElementsForThreads = 256;

void finalize_secure_cpu(const TensorSlice* tensors, size_t count, const ChaChaKey& key,
                         uint64_t scale_s, int grid_exp, double scale, uint32_t step) {
  int64_t total = 0;
  for (size_t p = 0; p < count; ++p) {
    if (tensors[p].numel > 0) total += tensors[p].numel;
  }
  const bool parallel = total >= kMinSecureElementsForThreads;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel if (parallel)
#endif
  {
    for (size_t p = 0; p < count; ++p) {
      const TensorSlice t = tensors[p];
      if (t.numel <= 0) continue;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1024) nowait
#endif
      for (int64_t j = 0; j < t.numel; ++j) {
        const int64_t k = secure_noise(key, step, t.offset + static_cast<uint64_t>(j), scale_s);
        const float a = t.acc ? t.acc[j] : 0.0f;
        t.out[j] = secure_finalize_value(a, k, grid_exp, scale);
      }
    }
  }
}

void discrete_gaussian_cpu(int64_t* out, int64_t n, uint64_t offset, const ChaChaKey& key,
                           uint64_t scale_s, uint32_t step) {
  const bool parallel = n >= kMinSecureElementsForThreads;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1024) if (parallel)
#endif
  for (int64_t i = 0; i < n; ++i) {
    out[i] = secure_noise(key, step, offset + static_cast<uint64_t>(i), scale_s);
  }
}

}  // namespace dpfast
