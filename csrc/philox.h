// dpfast counter-based noise generator and finalize contract, shared by the CPU (finalize_cpu.cpp)
// and CUDA (finalize_cuda.cu) code. The pure numpy reference of the same contract is
// dpfast/random.py: any change here must change there too (tests/test_random.py pins both).
//
// Generator: Philox4x32-10 (Salmon et al., SC'11; Random123 and curand use the same round function
// and constants). It is a pure function of (counter, key), so noise for an element depends only on
// (seed, step, element index) -- never on how parameters are split into tensors, their order, the
// number of ranks, or the launch configuration.
//
//   key     = (seed & 0xffffffff, seed >> 32)                    seed: uint64
//   counter = (b & 0xffffffff, b >> 32, step, stream)           b: uint64 block, step: uint32
//   streams : STREAM_NOISE = 0, STREAM_POISSON = 1, STREAM_AUX = 2 (per-record training randomness,
//             dpfast/random.py record_generators; not generated here)
//
// Gaussian noise for global element e: block b = e / 2, lane e % 2. The block's words form two
// 64-bit words w0 = x0 | x1 << 32, w1 = x2 | x3 << 32; in double (round to nearest)
//   u_r = ((double)w0 + 0.5) * 2^-64   in [2^-65, 1], exact for w0 < 2^52 (the radius' tail)
//   t   = 2 pi * ((w1 >> 11) * 2^-53)  angle uniform exact on the 2^-53 grid of [0, 1)
//   z_{2b} = sqrt(-2 ln u_r) cos t,  z_{2b+1} = sqrt(-2 ln u_r) sin t.
// So |z| <= sqrt(130 ln 2) = 9.49 (32-bit uniforms capped it at 6.76: dpfast/random.py states the
// delta such a cap leaves unaccounted, truncation_delta()).
// Poisson membership of sample j at step s: u0 = (x0 + 0.5) * 2^-32 of block b = j on
// STREAM_POISSON; in batch iff u0 < q.
//
// Finalize of element j of a tensor whose first element has global index `offset`:
//   out[j] = (float)(((double)acc[j] + noise_std * z(offset + j)) * scale)
// evaluated in double in exactly this order on CPU and GPU (both compiled without FMA contraction),
// so the two agree to within the last-place differences of the libm vs libdevice log/sin/cos.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define DPFAST_HD __host__ __device__ __forceinline__
#else
#define DPFAST_HD inline
#endif

namespace dpfast {

constexpr uint32_t kStreamNoise = 0;
constexpr uint32_t kStreamPoisson = 1;
constexpr uint32_t kStreamAux = 2;  // per-record training randomness (Python side only)

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

constexpr double kTwoPi = 6.283185307179586;        // double(2 * pi), same as numpy's 2 * np.pi
constexpr double kTwoPowMinus32 = 2.3283064365386963e-10;  // 2^-32, exact
constexpr double kTwoPowMinus53 = 1.1102230246251565e-16;  // 2^-53, exact
constexpr double kTwoPowMinus64 = 5.421010862427522e-20;   // 2^-64, exact

struct Philox4 {
  uint32_t x[4];
};

DPFAST_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32-10 bijection of the counter under key (k0, k1); the key is bumped between rounds.
DPFAST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Output of the generator for block b of `stream` at `step` under `seed`.
DPFAST_HD Philox4 philox_block(uint64_t seed, uint32_t step, uint32_t stream, uint64_t b) {
  return philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), step, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

DPFAST_HD double uniform_open01(uint32_t x) {
  return (static_cast<double>(x) + 0.5) * kTwoPowMinus32;  // both steps exact in double
}

DPFAST_HD uint64_t word64(uint32_t lo, uint32_t hi) {
  return static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
}

// Box-Muller of one pair of 64-bit words; sin/cos of the same angle (no sincospi: the CPU has none).
DPFAST_HD void box_muller(uint64_t wr, uint64_t wt, double& za, double& zb) {
  const double ur = (static_cast<double>(wr) + 0.5) * kTwoPowMinus64;  // in [2^-65, 1]
  const double r = sqrt(-2.0 * log(ur));
  const double t = kTwoPi * (static_cast<double>(wt >> 11) * kTwoPowMinus53);
  za = r * cos(t);
  zb = r * sin(t);
}

// The two standard normals of noise block b (elements 2b, 2b+1).
constexpr int kNormalsPerBlock = 2;
DPFAST_HD void normal_block(uint64_t seed, uint32_t step, uint64_t b, double z[2]) {
  const Philox4 x = philox_block(seed, step, kStreamNoise, b);
  box_muller(word64(x.x[0], x.x[1]), word64(x.x[2], x.x[3]), z[0], z[1]);
}

DPFAST_HD double poisson_uniform(uint64_t seed, uint32_t step, uint64_t sample_index) {
  return uniform_open01(philox_block(seed, step, kStreamPoisson, sample_index).x[0]);
}

DPFAST_HD float finalize_value(float acc, double z, double noise_std, double scale) {
  return static_cast<float>((static_cast<double>(acc) + noise_std * z) * scale);
}

// One parameter tensor of a finalize call. `acc` may equal `out` (in place); a null `acc` reads as
// zeros (used by normal_cpu / normal_cuda to emit the bare noise stream).
struct TensorSlice {
  const float* acc;
  float* out;
  int64_t numel;    // > 0 once it reaches a kernel (empty tensors are dropped on the host)
  uint64_t offset;  // global element index of out[0]
};

// Noise blocks touched by a tensor: blocks offset/2 .. (offset+numel-1)/2. A block that straddles
// two tensors is generated once for each of them (cheap, and keeps every element's noise exact).
DPFAST_HD uint64_t first_block(const TensorSlice& t) { return t.offset / kNormalsPerBlock; }
DPFAST_HD uint64_t num_blocks(const TensorSlice& t) {
  return (t.offset + static_cast<uint64_t>(t.numel) - 1) / kNormalsPerBlock -
         t.offset / kNormalsPerBlock + 1;
}

// Finalize the (up to two) elements of tensor t that fall in global noise block b.
// kNoise == false is the noise_std == 0 fast path: no generator call at all.
template <bool kNoise>
DPFAST_HD void finalize_block(const TensorSlice& t, uint64_t b, double noise_std, double scale,
                              uint64_t seed, uint32_t step) {
  double z[kNormalsPerBlock] = {0.0, 0.0};
  if (kNoise) normal_block(seed, step, b, z);
  // Local index of the block's lane 0; negative for the first block of an unaligned tensor.
  const int64_t j0 = static_cast<int64_t>(kNormalsPerBlock * b - t.offset);
#if defined(__CUDA_ARCH__)
#pragma unroll  // keeps z[] in registers
#endif
  for (int lane = 0; lane < kNormalsPerBlock; ++lane) {
    const int64_t j = j0 + lane;
    if (j < 0 || j >= t.numel) continue;
    const float a = t.acc ? t.acc[j] : 0.0f;
    t.out[j] = finalize_value(a, z[lane], noise_std, scale);
  }
}

// ---- Entry points (finalize_cpu.cpp, finalize_cuda.cu). They throw std::invalid_argument for bad
// ---- input (ValueError in Python) and std::runtime_error for CUDA failures (RuntimeError).
void finalize_cpu(const TensorSlice* tensors, size_t count, double noise_std, double scale,
                  uint64_t seed, uint32_t step);
void poisson_uniforms_cpu(double* out, const int64_t* indices, int64_t n, uint64_t seed,
                          uint32_t step);
#if defined(DPFAST_WITH_CUDA)
void finalize_cuda(const TensorSlice* tensors, size_t count, double noise_std, double scale,
                   uint64_t seed, uint32_t step, uintptr_t stream);
#endif

}  // namespace dpfast
