// dpfast secure noise: a ChaCha20 counter-based generator and an exact discrete Gaussian sampler,
// shared by the CPU (finalize_cpu.cpp) and CUDA (finalize_cuda.cu) code. The pure Python reference
// of the same contract is dpfast/random_secure.py (tests/test_random_secure.py pins both); any
// change here must change there too.
//
// Generator: the ChaCha20 block function of RFC 8439 (section 2.3: 20 rounds, 10 column/diagonal
// double rounds, the input added back), keyed by a 256-bit key (8 little-endian words). The four
// input words RFC 8439 uses for (block counter, nonce) carry our counter instead:
//   state[12..15] = (e & 0xffffffff, e >> 32, step, stream << 24 | j)
// where e is the global element index, j = 0, 1, 2, ... the element's own sub-block (a sample needs
// a variable number of words), step in [0, 2^32), stream = STREAM_NOISE = 0. The words an element
// consumes therefore depend only on (key, step, e): never on layout, launch shape or device.
// Words are read in order: block j's words 0..15, then block j+1's.
//
// Noise: k ~ N_Z(0, S^2), the discrete Gaussian on the integers with integer scale S (Canonne,
// Kamath, Steinke 2020, Algorithm 3 over their Algorithms 1 and 2), sampled exactly with integer
// arithmetic only:
//   uniform_below(m): L = bit length of m - 1; draw ceil(L/32) words (low word first), keep the low
//                     L bits, return it if < m, else draw again (exactly uniform on [0, m)).
//   bernoulli(n, d):  uniform_below(d) < n.
//   bern_exp(n, d):   Bernoulli(exp(-n/d)): floor(n/d) times Bernoulli(exp(-1)) (stop at the
//                     first 0), then the fractional part by CKS Algorithm 1 (K = 1; while
//                     bernoulli(n', d K) K++; return K odd), with Bernoulli(exp(-1)) = (1, 1).
//   laplace(t):       loop { U = uniform_below(t); if !bern_exp(U, t) continue; V = 0;
//                     while bern_exp(1, 1) V++; X = U + t V; B = next word & 1;
//                     if B && X == 0 continue; return B ? -X : X }
//   gaussian(S):      t = S + 1; loop { Y = laplace(t); if |Y| >= 2^36 continue;
//                     if bern_exp((|Y| t - S^2)^2, 2 S^2 t^2) return Y }
// The |Y| < 2^36 cut conditions N_Z(0, S^2) on |k| < 2^36, a mass below exp(-2^21) for S <= 2^25,
// and keeps every product inside 128 bits.
//
// Finalize of element j of a tensor whose first element has global index `offset`, on the grid
// g = 2^grid_exp (S = ceil(noise_std / g), chosen by dpfast/finalize.py):
//   a = clamp(rint(acc[j] * 2^-grid_exp), -2^52, 2^52)   (exact; round half to even)
//   out[j] = (float)(((double)(a + k(offset + j)) * g) * scale)
// and NaN where acc[j] is not finite. a + k is an exact integer; everything after it is a fixed
// function of that integer (post-processing).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "philox.h"  // DPFAST_HD, TensorSlice, kStreamNoise

namespace dpfast {

using u128 = unsigned __int128;

constexpr int kSecureMaxScaleBits = 25;           // S <= 2^25
constexpr int64_t kSecureMaxNoise = int64_t(1) << 36;  // |k| < 2^36
constexpr int64_t kSecureMaxData = int64_t(1) << 52;   // |a| <= 2^52

struct ChaChaKey {
  uint32_t k[8];
};

DPFAST_HD uint32_t rotl32(uint32_t v, int c) { return (v << c) | (v >> (32 - c)); }

#define DPFAST_CHACHA_QR(a, b, c, d) \
  a += b; d ^= a; d = rotl32(d, 16);  \
  c += d; b ^= c; b = rotl32(b, 12);  \
  a += b; d ^= a; d = rotl32(d, 8);   \
  c += d; b ^= c; b = rotl32(b, 7);

// RFC 8439 block function with input words 12..15 = (w12, w13, w14, w15).
DPFAST_HD void chacha20_block(const ChaChaKey& key, uint32_t w12, uint32_t w13, uint32_t w14,
                              uint32_t w15, uint32_t out[16]) {
  const uint32_t in[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                           key.k[0], key.k[1], key.k[2], key.k[3],
                           key.k[4], key.k[5], key.k[6], key.k[7],
                           w12, w13, w14, w15};
  uint32_t x[16];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 16; ++i) x[i] = in[i];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    DPFAST_CHACHA_QR(x[0], x[4], x[8], x[12])
    DPFAST_CHACHA_QR(x[1], x[5], x[9], x[13])
    DPFAST_CHACHA_QR(x[2], x[6], x[10], x[14])
    DPFAST_CHACHA_QR(x[3], x[7], x[11], x[15])
    DPFAST_CHACHA_QR(x[0], x[5], x[10], x[15])
    DPFAST_CHACHA_QR(x[1], x[6], x[11], x[12])
    DPFAST_CHACHA_QR(x[2], x[7], x[8], x[13])
    DPFAST_CHACHA_QR(x[3], x[4], x[9], x[14])
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 16; ++i) out[i] = x[i] + in[i];
}
#undef DPFAST_CHACHA_QR

// The word stream of one element: blocks j = 0, 1, ... of counter (e, step, stream, j).
struct SecureWords {
  ChaChaKey key;
  uint32_t e_lo, e_hi, step, stream_hi;
  uint32_t j;
  int pos;
  uint32_t w[16];

  DPFAST_HD SecureWords(const ChaChaKey& k, uint64_t e, uint32_t step_, uint32_t stream)
      : key(k), e_lo(static_cast<uint32_t>(e)), e_hi(static_cast<uint32_t>(e >> 32)),
        step(step_), stream_hi(stream << 24), j(0), pos(16) {}

  DPFAST_HD uint32_t next() {
    if (pos == 16) {
      // j < 2^24 always in practice: a sample uses a few blocks (2^24 would take ~2^28 words).
      chacha20_block(key, e_lo, e_hi, step, stream_hi | (j & 0xFFFFFFu), w);
      ++j;
      pos = 0;
    }
    return w[pos++];
  }
};

DPFAST_HD int bit_length(u128 v) {
  int n = 0;
  while (v) {
    v >>= 1;
    ++n;
  }
  return n;
}

// Exactly uniform on [0, m), m >= 1.
DPFAST_HD u128 uniform_below(SecureWords& s, u128 m) {
  if (m <= 1) return 0;
  const int bits = bit_length(m - 1);
  const int words = (bits + 31) / 32;
  const u128 mask = bits >= 128 ? ~u128(0) : ((u128(1) << bits) - 1);
  for (;;) {
    u128 x = 0;
    for (int i = 0; i < words; ++i) x |= u128(s.next()) << (32 * i);
    x &= mask;
    if (x < m) return x;
  }
}

DPFAST_HD bool bernoulli(SecureWords& s, u128 n, u128 d) { return uniform_below(s, d) < n; }

// Bernoulli(exp(-n/d)) for n <= d (CKS Algorithm 1, gamma in [0, 1]).
DPFAST_HD bool bern_exp_frac(SecureWords& s, u128 n, u128 d) {
  uint64_t k = 1;
  // k < 2^24 keeps d * k inside 128 bits (d < 2^103); reaching it has probability < 1/(2^24)!.
  while (k < (uint64_t(1) << 24) && bernoulli(s, n, d * k)) ++k;
  return (k & 1) == 1;
}

// Bernoulli(exp(-n/d)) for any n >= 0, d >= 1.
DPFAST_HD bool bern_exp(SecureWords& s, u128 n, u128 d) {
  const u128 whole = n / d;
  for (u128 i = 0; i < whole; ++i) {
    if (!bern_exp_frac(s, 1, 1)) return false;
  }
  return bern_exp_frac(s, n - whole * d, d);
}

// Discrete Laplace with scale t >= 1: P(x) proportional to exp(-|x| / t) (CKS Algorithm 2, s = 1).
DPFAST_HD int64_t discrete_laplace(SecureWords& s, uint64_t t) {
  for (;;) {
    const uint64_t u = static_cast<uint64_t>(uniform_below(s, t));
    if (!bern_exp(s, u, t)) continue;
    uint64_t v = 0;
    while (bern_exp_frac(s, 1, 1)) ++v;
    const u128 x = u128(u) + u128(t) * v;
    const bool negative = (s.next() & 1u) != 0;
    if (negative && x == 0) continue;
    // Values at or beyond 2^36 are cut by the caller; saturate so the cast cannot wrap.
    const int64_t xi = x >= u128(kSecureMaxNoise) ? kSecureMaxNoise : static_cast<int64_t>(x);
    return negative ? -xi : xi;
  }
}

// k ~ N_Z(0, S^2) conditioned on |k| < 2^36 (CKS Algorithm 3 with sigma = S an integer).
DPFAST_HD int64_t discrete_gaussian(SecureWords& s, uint64_t scale_s) {
  const uint64_t t = scale_s + 1;
  const u128 s2 = u128(scale_s) * scale_s;
  const u128 den = 2 * s2 * t * t;
  for (;;) {
    const int64_t y = discrete_laplace(s, t);
    const uint64_t ay = static_cast<uint64_t>(y < 0 ? -y : y);
    if (ay >= static_cast<uint64_t>(kSecureMaxNoise)) continue;
    const u128 yt = u128(ay) * t;
    const u128 diff = yt >= s2 ? yt - s2 : s2 - yt;
    if (bern_exp(s, diff * diff, den)) return y;
  }
}

DPFAST_HD int64_t secure_noise(const ChaChaKey& key, uint32_t step, uint64_t e, uint64_t scale_s) {
  SecureWords s(key, e, step, kStreamNoise);
  return discrete_gaussian(s, scale_s);
}

// The data on the grid 2^grid_exp: exact, round half to even, clamped to |a| <= 2^52.
DPFAST_HD int64_t secure_grid_value(float acc, int grid_exp) {
  const double x = rint(ldexp(static_cast<double>(acc), -grid_exp));
  const double lim = static_cast<double>(kSecureMaxData);
  return static_cast<int64_t>(x > lim ? lim : (x < -lim ? -lim : x));
}

DPFAST_HD float secure_finalize_value(float acc, int64_t k, int grid_exp, double scale) {
  const float nonfinite = acc - acc;  // 0 for finite acc, NaN for NaN and +-inf
  if (nonfinite != 0.0f) return nonfinite;
  const int64_t n = secure_grid_value(acc, grid_exp) + k;
  return static_cast<float>(ldexp(static_cast<double>(n), grid_exp) * scale);
}

// ---- Entry points (finalize_cpu.cpp, finalize_cuda.cu). scale_s in [1, 2^25]; the caller checks.
void finalize_secure_cpu(const TensorSlice* tensors, size_t count, const ChaChaKey& key,
                         uint64_t scale_s, int grid_exp, double scale, uint32_t step);
void discrete_gaussian_cpu(int64_t* out, int64_t n, uint64_t offset, const ChaChaKey& key,
                           uint64_t scale_s, uint32_t step);
#if defined(DPFAST_WITH_CUDA)
void finalize_secure_cuda(const TensorSlice* tensors, size_t count, const ChaChaKey& key,
                          uint64_t scale_s, int grid_exp, double scale, uint32_t step,
                          uintptr_t stream);
#endif

}  // namespace dpfast
