// Math shared by the C++ CPU kernels and the CUDA kernels of fastsat._C (METHODS.md §2, §4):
// the counter-based random number generator and the per-element step formulas. Plain C++ for the
// host compiler, __host__ __device__ under nvcc; no torch headers.
//
// Both builds compile without floating-point contraction (-ffp-contract=off, nvcc --fmad=false)
// so that every formula here rounds exactly as the PyTorch reference does, op for op.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FASTSAT_HD __host__ __device__ __forceinline__
#else
#define FASTSAT_HD inline
#endif

namespace fastsat {

// Arithmetic type of a storage type: float for float/half/bfloat16, double for double.
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };
template <typename T> using acc_t = typename Accumulate<T>::type;

// --- random numbers: Philox4x32-10 (Salmon et al., SC'11) ------------------------------------
//
// Key = the 64-bit seed. Counter = (q, sample low, sample high, stream): call q of a sample gives
// the four 32-bit words used by its elements 4q .. 4q+3, so every element's draw depends only on
// (seed, stream, sample, position in the sample's memory block), never on threads or blocks.
// Each random quantity has its own stream, hence independent draws.
enum Stream : uint32_t {
  kStreamUniform = 0,   // random_start, L∞: δ uniform in [−ε, ε)
  kStreamGaussian = 1,  // random_start, L2: direction from Box–Muller Gaussians
  kStreamRadius = 2,    // random_start, L2: per-sample radius ε·U^(1/d), call q = 0
  kStreamSat = 3,       // sat_perturb: random sign n (bit 31) and Bernoulli(p) w (bits 0..23) of one word
};

struct Words4 {
  uint32_t w[4];
};

FASTSAT_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

// One Philox round: counter (c0, c1, c2, c3) under round key (k0, k1).
FASTSAT_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_hi_lo(0xD2511F53u, c0, hi0, lo0);
  mul_hi_lo(0xCD9E8D57u, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Round keys advance by the Weyl constants between rounds.
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

FASTSAT_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0 + round * kPhiloxW0, k1 + round * kPhiloxW1);
  }
  return Words4{{c0, c1, c2, c3}};
}

FASTSAT_HD Words4 random_words(uint64_t seed, Stream stream, int64_t sample, int64_t call) {
  const uint64_t s = static_cast<uint64_t>(sample);
  return philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The top 24 bits of a word as a float in [0, 1) (exactly representable).
FASTSAT_HD float uniform_co(uint32_t word) { return static_cast<float>(word >> 8) * 0x1p-24f; }
// The low 24 bits of a word as a float in [0, 1): independent of the word's top bit.
FASTSAT_HD float uniform_low_co(uint32_t word) { return static_cast<float>(word & 0x00FFFFFFu) * 0x1p-24f; }
// ... and in (0, 1], for logarithms and powers.
FASTSAT_HD float uniform_oc(uint32_t word) { return static_cast<float>((word >> 8) + 1u) * 0x1p-24f; }

FASTSAT_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

FASTSAT_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// ln(u) for a normal float u > 0 (here u in (0, 1]): the Cephes logf polynomial, branch-free so
// CPU loops vectorise, and the same bits on CPU and GPU (basic IEEE operations only); within
// 2 ulp of the true value.
FASTSAT_HD float log_positive(float u) {
  const uint32_t bits = float_bits(u);
  float exponent = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  const float mantissa = float_from_bits((bits & 0x007FFFFFu) | 0x3F000000u);  // u = mantissa·2^exponent, [0.5, 1)
  const bool low = mantissa < 0.707106781186547524f;
  exponent = low ? exponent - 1.0f : exponent;
  const float x = low ? (mantissa + mantissa) - 1.0f : mantissa - 1.0f;  // in [√½ − 1, √2 − 1)
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y - 2.12194440e-4f * exponent;
  y = y - 0.5f * z;
  return (x + y) + 0.693359375f * exponent;
}

// cos(2πu) and sin(2πu) for u in [0, 1): exact reduction to the nearest quarter turn, Cephes
// polynomials on [−π/4, π/4]; branch-free, within 2 ulp (absolute 1e-7).
FASTSAT_HD void cos_sin_turns(float u, float& c, float& s) {
  const float quarters = 4.0f * u;                                       // exact
  const int32_t quadrant = static_cast<int32_t>(quarters + 0.5f);        // nearest, 0 .. 4
  const float x = (quarters - static_cast<float>(quadrant)) * 1.57079632679489662f;  // [−π/4, π/4]
  const float z = x * x;
  const float sin_x = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float cos_x = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                      0.5f * z + 1.0f;
  const int32_t q = quadrant & 3;  // rotate (cos x, sin x) by q quarter turns
  c = q == 0 ? cos_x : (q == 1 ? -sin_x : (q == 2 ? -cos_x : sin_x));
  s = q == 0 ? sin_x : (q == 1 ? cos_x : (q == 2 ? -sin_x : -cos_x));
}

// Box–Muller: two independent standard Gaussians from two words.
FASTSAT_HD void box_muller(uint32_t w0, uint32_t w1, float& z0, float& z1) {
  const float radius = sqrtf(-2.0f * log_positive(uniform_oc(w0)));
  float c, s;
  cos_sin_turns(uniform_co(w1), c, s);
  z0 = radius * c;
  z1 = radius * s;
}

// Four Gaussians for elements 4q .. 4q+3 of a sample.
FASTSAT_HD void gaussians4(uint64_t seed, int64_t sample, int64_t call, float (&z)[4]) {
  const Words4 r = random_words(seed, kStreamGaussian, sample, call);
  box_muller(r.w[0], r.w[1], z[0], z[1]);
  box_muller(r.w[2], r.w[3], z[2], z[3]);
}

// --- per-element formulas (A = float or double) -----------------------------------------------

// torch.sign: 0 for ±0 and NaN.
template <typename A> FASTSAT_HD A sign_of(A v) { return static_cast<A>((A(0) < v) - (v < A(0))); }
// torch.maximum / torch.minimum against a finite bound: a NaN value stays NaN.
template <typename A> FASTSAT_HD A at_least(A v, A bound) { return v < bound ? bound : v; }
template <typename A> FASTSAT_HD A at_most(A v, A bound) { return bound < v ? bound : v; }
template <typename A> FASTSAT_HD A clamp_to(A v, A lo, A hi) { return at_most(at_least(v, lo), hi); }

// L∞: clip(Π_ε(x + α·sign(g))), in the reference's op order (bitwise equal to it).
template <typename A> FASTSAT_HD A linf_step(A x, A g, A x_nat, A step, A eps, A lo, A hi) {
  const A stepped = x + step * sign_of(g);
  return clamp_to(at_most(at_least(stepped, x_nat - eps), x_nat + eps), lo, hi);
}

// L2 with the per-sample step scale c = α/‖g‖ and projection factor min(1, ε/‖δ‖) known.
template <typename A> FASTSAT_HD A l2_step(A x, A g, A x_nat, A scale, A factor, A lo, A hi) {
  const A delta = (x + scale * g) - x_nat;
  return clamp_to(x_nat + factor * delta, lo, hi);
}

// Per-sample L2 step coefficients from one reduction pass over d = x − x_nat and g:
// c = α/‖g‖ (0 for a zero gradient) and factor = min(1, ε/‖d + c·g‖), where
// ‖d + c·g‖² = ‖d‖² + 2c⟨d, g⟩ + c²‖g‖².
template <typename A>
FASTSAT_HD void l2_coefficients(double dd, double dg, double gg, double step, double eps, A& scale, A& factor) {
  scale = gg > 0.0 ? static_cast<A>(step / sqrt(gg)) : A(0);
  const double c = static_cast<double>(scale);
  const double norm_sq = dd + 2.0 * c * dg + c * c * gg;
  const double norm = norm_sq > 0.0 ? sqrt(norm_sq) : 0.0;
  factor = norm > eps ? static_cast<A>(eps / norm) : A(1);
}

// L2 random start: radius ε·U^(1/d) of sample b (uniform volume in the d-ball), divided by the
// norm of its Gaussian direction vector.
FASTSAT_HD double l2_start_scale(uint64_t seed, int64_t sample, int64_t dim, double eps, double gaussian_sq) {
  const Words4 r = random_words(seed, kStreamRadius, sample, 0);
  const double radius = eps * pow(static_cast<double>(uniform_oc(r.w[0])), 1.0 / static_cast<double>(dim));
  return gaussian_sq > 0.0 ? radius / sqrt(gaussian_sq) : 0.0;
}

// sat_perturb: s = S with probability p, else a fair random sign; x' = clip(x − ε·s). Both draws
// come from disjoint bits of one word (sign: bit 31; Bernoulli: bits 0..23), so one Philox call
// serves four elements.
template <typename A>
FASTSAT_HD A sat_value(A x, A saliency, uint32_t word, float p, A eps, A lo, A hi) {
  const A noise = (word >> 31) ? A(1) : A(-1);
  const A s = uniform_low_co(word) < p ? saliency : noise;
  return clamp_to(x - eps * s, lo, hi);
}

// Box saliency: +1 inside the half-open box [x0, x1) × [y0, y1), −1 outside.
FASTSAT_HD float box_value(const int64_t* box, int64_t row, int64_t col) {
  return (col >= box[0] && col < box[2] && row >= box[1] && row < box[3]) ? 1.0f : -1.0f;
}

}  // namespace fastsat
