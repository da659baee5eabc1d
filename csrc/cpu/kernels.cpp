// C++ CPU kernels of the fused ops (METHODS.md §2, §4).
//
// Work is split into tasks of at most kChunk elements of one sample, run with at::parallel_for.
// A task streams its range in tiles of kTile elements: inputs are converted to the arithmetic type
// into small local arrays, the formulas of common/math.h run over those arrays (loops the compiler
// vectorises; the local arrays also keep an in-place `out` from defeating vectorisation), and
// results are rounded once to the storage type. A gradient may be stored in float32 for a 16-bit
// input (G = float): it is read as it is, never rounded to 16 bits. Per-sample sums are kept per task in kLanes
// independent accumulators (per tile in the arithmetic type, across tiles in float64) and added up
// per sample in task order, so every result is the same whatever the number of threads. The hot per-task functions are compiled for AVX-512, AVX2
// and baseline x86-64 and picked at load time (GCC target_clones); contraction is off
// (-ffp-contract=off), so all three give identical bits.
//
// Passes over memory: L∞ pgd_step, L∞ random_start, sat_perturb and alignment_stats one; L2
// pgd_step two (a reduction pass for ‖g‖², ⟨x − x_nat, g⟩, ‖x − x_nat‖², then the write pass; fusing
// both into one task per sample for samples of at most kChunk elements was measured no faster here:
// bench/results/cpu-ops-2026-11-30-kernels.md);
// L2 random_start two (Gaussian norms, then the write pass regenerating the same Gaussians).
#include "cpu/kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSAT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSAT_ISA_CLONES
#endif
#define FASTSAT_INLINE inline __attribute__((always_inline))

namespace fastsat::cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per task (a multiple of 4: whole RNG calls)
constexpr int64_t kTile = 256;       // elements per tile (a multiple of 4 and of kLanes)
constexpr int kLanes = 16;           // independent accumulators per sum
constexpr int64_t kMinElementsPerThread = 1 << 15;  // less is not worth waking a thread for

struct Tasks {
  int64_t batch;
  int64_t per_sample;
  int64_t chunks;

  Tasks(int64_t batch_, int64_t per_sample_)
      : batch(batch_), per_sample(per_sample_), chunks((per_sample_ + kChunk - 1) / kChunk) {}
  int64_t count() const { return batch * chunks; }
  int64_t sample(int64_t task) const { return task / chunks; }
  int64_t begin(int64_t task) const { return (task % chunks) * kChunk; }
  int64_t end(int64_t task) const { return std::min(per_sample, begin(task) + kChunk); }
};

template <typename F>
void parallel_tasks(const Tasks& tasks, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::min(tasks.per_sample, kChunk));
  at::parallel_for(0, tasks.count(), grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) body(task);
  });
}

// --- tiles -------------------------------------------------------------------------------------

template <typename T, typename A>
FASTSAT_INLINE void load(const T* src, A* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]);
}

// n values of src in A: src itself when T is A (no copy), else converted into buf.
template <typename T, typename A>
FASTSAT_INLINE const A* view_as(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    load(src, buf, n);
    return buf;
  }
}

// Rounds v to T once, in place (the value that will be stored, back in A).
template <typename T, typename A>
FASTSAT_INLINE void round_to_storage(A* v, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<A>(static_cast<T>(v[j]));
  }
}

// Converts to T and stores (exact for values rounded by round_to_storage).
template <typename T, typename A>
FASTSAT_INLINE void store(const A* v, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(v[j]);
}

// K per-sample sums in kLanes float64 accumulators. Within a tile the products are summed in A
// (at most kTile / kLanes = 16 terms a lane: relative error < 1e-6 in float32), then added in
// float64: half the vector work of float64 throughout, and the accuracy of blocked summation.
template <int K>
struct LaneSums {
  double lane[K][kLanes] = {};

  template <typename A>
  FASTSAT_INLINE void add(int k, const A* a, const A* b, int64_t n) {
    A tile[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) tile[l] += a[j + l] * b[j + l];
    }
    for (int l = 0; j + l < n; ++l) tile[l] += a[j + l] * b[j + l];
    for (int l = 0; l < kLanes; ++l) lane[k][l] += static_cast<double>(tile[l]);
  }

  void write(double* out) const {
    for (int k = 0; k < K; ++k) {
      double total = 0.0;
      for (int l = 0; l < kLanes; ++l) total += lane[k][l];
      out[k] = total;
    }
  }
};

// max |a − b| with one accumulator per tile position (an elementwise loop, which vectorises where a
// max-reduction would not), NaN if any difference is NaN (like torch.amax). The differences are
// finite or NaN (a is clipped, b finite), so v·0 is 0 or NaN: adding it up tracks NaNs without
// branches.
template <typename A>
struct TileMaxAbsDiff {
  A max[kTile] = {};
  A nan[kTile] = {};

  FASTSAT_INLINE void add(const A* a, const A* b, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const A v = a[j] > b[j] ? a[j] - b[j] : b[j] - a[j];
      max[j] = at_least(v, max[j]);
      nan[j] += v * A(0);
    }
  }

  double total() const {
    double m = 0.0, nan_sum = 0.0;
    for (int64_t j = 0; j < kTile; ++j) {
      m = at_least(static_cast<double>(max[j]), m);
      nan_sum += static_cast<double>(nan[j]);
    }
    return m + nan_sum;
  }
};

// Per-sample totals of K per-task partials (task-major), added in task order.
std::vector<double> per_sample_sums(const Tasks& tasks, const std::vector<double>& partial, int K) {
  std::vector<double> total(tasks.batch * K, 0.0);
  for (int64_t t = 0; t < tasks.count(); ++t) {
    for (int k = 0; k < K; ++k) total[tasks.sample(t) * K + k] += partial[t * K + k];
  }
  return total;
}

// --- pgd_step ----------------------------------------------------------------------------------

template <typename T, typename G, bool kStats>
FASTSAT_ISA_CLONES void linf_step_task(const PgdStepArgs& a, int64_t sample, int64_t begin, int64_t end,
                                       double* partial) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A step = static_cast<A>(a.step_size), eps = static_cast<A>(a.eps);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A xb[kTile], gb[kTile], nb[kTile], ob[kTile];
  LaneSums<3> sums;
  TileMaxAbsDiff<A> delta_max;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* xv = view_as(x + s, xb, n);
    const A* gv = view_as(g + s, gb, n);
    const A* nv = view_as(nat + s, nb, n);
    for (int64_t j = 0; j < n; ++j) ob[j] = linf_step(xv[j], gv[j], nv[j], step, eps, lo, hi);
    round_to_storage<T>(ob, n);
    if constexpr (kStats) {  // before the store: out may alias x_nat
      sums.add(0, nv, gv, n);
      sums.add(1, gv, gv, n);
      sums.add(2, nv, nv, n);
      delta_max.add(ob, nv, n);
    }
    store(ob, out + s, n);
  }
  if constexpr (kStats) {
    sums.write(partial);
    partial[3] = delta_max.total();
  }
}

// L2 reduction pass: ‖g‖², ⟨d, g⟩, ‖d‖² with d = x − x_nat (+ ⟨x_nat, g⟩, ‖x_nat‖² for stats).
template <typename T, typename G, bool kStats>
FASTSAT_ISA_CLONES void l2_reduce_task(const PgdStepArgs& a, int64_t sample, int64_t begin, int64_t end,
                                       double* partial) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  A xb[kTile], gb[kTile], nb[kTile], db[kTile];
  LaneSums<5> sums;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* xv = view_as(x + s, xb, n);
    const A* gv = view_as(g + s, gb, n);
    const A* nv = view_as(nat + s, nb, n);
    for (int64_t j = 0; j < n; ++j) db[j] = xv[j] - nv[j];
    sums.add(0, gv, gv, n);
    sums.add(1, db, gv, n);
    sums.add(2, db, db, n);
    if constexpr (kStats) {
      sums.add(3, nv, gv, n);
      sums.add(4, nv, nv, n);
    }
  }
  sums.write(partial);
}

// L2 write pass with the per-sample coefficients; ‖out − x_nat‖² for stats.
template <typename T, typename G, bool kStats>
FASTSAT_ISA_CLONES void l2_apply_task(const PgdStepArgs& a, int64_t sample, int64_t begin, int64_t end,
                                      acc_t<T> scale, acc_t<T> factor, double* partial) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A xb[kTile], gb[kTile], nb[kTile], ob[kTile], db[kTile];
  LaneSums<1> sums;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* xv = view_as(x + s, xb, n);
    const A* gv = view_as(g + s, gb, n);
    const A* nv = view_as(nat + s, nb, n);
    for (int64_t j = 0; j < n; ++j) ob[j] = l2_step(xv[j], gv[j], nv[j], scale, factor, lo, hi);
    round_to_storage<T>(ob, n);
    if constexpr (kStats) {  // before the store: out may alias x_nat
      for (int64_t j = 0; j < n; ++j) db[j] = ob[j] - nv[j];
      sums.add(0, db, db, n);
    }
    store(ob, out + s, n);
  }
  if constexpr (kStats) sums.write(partial);
}

template <typename T, typename G, bool kStats>
void pgd_step_impl(const PgdStepArgs& a) {
  using A = acc_t<T>;
  const Tasks tasks(a.batch, a.per_sample);
  A* stats = static_cast<A*>(a.stats);
  if (!a.l2) {
    std::vector<double> partial(kStats ? tasks.count() * 4 : 0);
    parallel_tasks(tasks, [&](int64_t t) {
      linf_step_task<T, G, kStats>(a, tasks.sample(t), tasks.begin(t), tasks.end(t), partial.data() + (kStats ? t * 4 : 0));
    });
    if constexpr (kStats) {
      for (int64_t b = 0; b < a.batch; ++b) {
        double sums[3] = {0.0, 0.0, 0.0}, delta_max = 0.0;
        for (int64_t t = b * tasks.chunks; t < (b + 1) * tasks.chunks; ++t) {
          for (int k = 0; k < 3; ++k) sums[k] += partial[t * 4 + k];
          const double v = partial[t * 4 + 3];
          delta_max = (delta_max < v || v != v) ? v : delta_max;
        }
        stats[b * 4 + 0] = static_cast<A>(sums[0]);
        stats[b * 4 + 1] = static_cast<A>(sqrt(sums[1]));
        stats[b * 4 + 2] = static_cast<A>(sqrt(sums[2]));
        stats[b * 4 + 3] = static_cast<A>(delta_max);
      }
    }
    return;
  }
  std::vector<double> partial(tasks.count() * 5);
  parallel_tasks(tasks, [&](int64_t t) {
    l2_reduce_task<T, G, kStats>(a, tasks.sample(t), tasks.begin(t), tasks.end(t), partial.data() + t * 5);
  });
  const std::vector<double> sums = per_sample_sums(tasks, partial, 5);
  std::vector<A> scale(a.batch), factor(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    const double* s = &sums[b * 5];
    l2_coefficients(s[2], s[1], s[0], a.step_size, a.eps, scale[b], factor[b]);
  }
  std::vector<double> delta_partial(kStats ? tasks.count() : 0);
  parallel_tasks(tasks, [&](int64_t t) {
    const int64_t b = tasks.sample(t);
    l2_apply_task<T, G, kStats>(a, b, tasks.begin(t), tasks.end(t), scale[b], factor[b],
                             delta_partial.data() + (kStats ? t : 0));
  });
  if constexpr (kStats) {
    const std::vector<double> delta_sq = per_sample_sums(tasks, delta_partial, 1);
    for (int64_t b = 0; b < a.batch; ++b) {
      stats[b * 4 + 0] = static_cast<A>(sums[b * 5 + 3]);
      stats[b * 4 + 1] = static_cast<A>(sqrt(sums[b * 5 + 0]));
      stats[b * 4 + 2] = static_cast<A>(sqrt(sums[b * 5 + 4]));
      stats[b * 4 + 3] = static_cast<A>(sqrt(delta_sq[b]));
    }
  }
}

// --- alignment_stats ---------------------------------------------------------------------------

template <typename T, typename G>
FASTSAT_ISA_CLONES void alignment_task(const AlignmentStatsArgs& a, int64_t sample, int64_t begin, int64_t end,
                                       double* partial) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.g) + base;
  A xb[kTile], gb[kTile];
  LaneSums<3> sums;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* xv = view_as(x + s, xb, n);
    const A* gv = view_as(g + s, gb, n);
    sums.add(0, xv, gv, n);
    sums.add(1, gv, gv, n);
    sums.add(2, xv, xv, n);
  }
  sums.write(partial);
}

// --- random_start ------------------------------------------------------------------------------

// Words of `stream` for elements [s, s + n) of a sample, s a multiple of 4, n <= kTile: the
// Philox calls of the tile run side by side, round by round, so the loop vectorises.
FASTSAT_INLINE void fill_words(uint64_t seed, Stream stream, int64_t sample, int64_t s, int64_t n, uint32_t* words) {
  constexpr int64_t kCalls = kTile / 4;
  uint32_t c0[kCalls], c1[kCalls], c2[kCalls], c3[kCalls];
  const int64_t calls = (n + 3) / 4;
  const uint64_t sample_bits = static_cast<uint64_t>(sample);
  for (int64_t q = 0; q < calls; ++q) {
    c0[q] = static_cast<uint32_t>(s / 4 + q);
    c1[q] = static_cast<uint32_t>(sample_bits);
    c2[q] = static_cast<uint32_t>(sample_bits >> 32);
    c3[q] = static_cast<uint32_t>(stream);
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t k0 = static_cast<uint32_t>(seed) + round * kPhiloxW0;
    const uint32_t k1 = static_cast<uint32_t>(seed >> 32) + round * kPhiloxW1;
    for (int64_t q = 0; q < calls; ++q) philox_round(c0[q], c1[q], c2[q], c3[q], k0, k1);
  }
  for (int64_t q = 0; q < calls; ++q) {
    words[4 * q + 0] = c0[q];
    words[4 * q + 1] = c1[q];
    words[4 * q + 2] = c2[q];
    words[4 * q + 3] = c3[q];
  }
}

// Gaussians for elements [s, s + n): Box–Muller on consecutive word pairs (as gaussians4).
FASTSAT_INLINE void fill_gaussians(uint64_t seed, int64_t sample, int64_t s, int64_t n, float* z) {
  uint32_t words[kTile];
  fill_words(seed, kStreamGaussian, sample, s, n, words);
  for (int64_t pair = 0; 2 * pair < n; ++pair) {
    box_muller(words[2 * pair], words[2 * pair + 1], z[2 * pair], z[2 * pair + 1]);
  }
}

template <typename T>
FASTSAT_ISA_CLONES void linf_start_task(const RandomStartArgs& a, uint64_t seed, int64_t sample, int64_t begin,
                                       int64_t end) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A nb[kTile], ob[kTile];
  uint32_t words[kTile];
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* nv = view_as(nat + s, nb, n);
    fill_words(seed, kStreamUniform, sample, s, n, words);
    for (int64_t j = 0; j < n; ++j) {
      const A delta = (A(2) * static_cast<A>(uniform_co(words[j])) - A(1)) * eps;
      ob[j] = clamp_to(nv[j] + delta, lo, hi);
    }
    store(ob, out + s, n);
  }
}

FASTSAT_ISA_CLONES void gaussian_norm_task(uint64_t seed, int64_t sample, int64_t begin, int64_t end,
                                           double* partial) {
  float z[kTile];
  LaneSums<1> sums;
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    fill_gaussians(seed, sample, s, n, z);
    sums.add(0, z, z, n);
  }
  sums.write(partial);
}

template <typename T>
FASTSAT_ISA_CLONES void l2_start_task(const RandomStartArgs& a, uint64_t seed, int64_t sample, int64_t begin,
                                      int64_t end, acc_t<T> scale) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A nb[kTile], ob[kTile];
  float z[kTile];
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* nv = view_as(nat + s, nb, n);
    fill_gaussians(seed, sample, s, n, z);
    for (int64_t j = 0; j < n; ++j) ob[j] = clamp_to(nv[j] + static_cast<A>(z[j]) * scale, lo, hi);
    store(ob, out + s, n);
  }
}

// --- sat_perturb -------------------------------------------------------------------------------

// Saliency S of pixels (row, col .. col + n) of a sample's (H, W) plane, in A.
template <typename T, typename A>
FASTSAT_INLINE void row_saliency(const SatPerturbArgs& a, int64_t sample, int64_t row, int64_t col, int64_t n, A* out) {
  const int64_t pixel = (sample * a.height + row) * a.width + col;
  if (a.kind == SaliencySource::kBoxes) {
    const int64_t* box = static_cast<const int64_t*>(a.source) + sample * 4;
    const bool row_inside = row >= box[1] && row < box[3];
    for (int64_t k = 0; k < n; ++k) {
      out[k] = (row_inside && col + k >= box[0] && col + k < box[2]) ? A(1) : A(-1);
    }
  } else if (a.kind == SaliencySource::kMasks) {
    const uint8_t* mask = static_cast<const uint8_t*>(a.source) + pixel;
    for (int64_t k = 0; k < n; ++k) out[k] = mask[k] ? A(1) : A(-1);
  } else {
    load(static_cast<const T*>(a.source) + pixel, out, n);
  }
}

// Saliency S of elements [s, s + n) of a sample, in A: row by row for a contiguous (C, H, W)
// sample, pixel by pixel (one value for its C channels) for a channels_last one.
template <typename T, typename A>
FASTSAT_INLINE void fill_saliency(const SatPerturbArgs& a, int64_t sample, int64_t s, int64_t n, A* out) {
  if (a.kind == SaliencySource::kDense) {
    load(static_cast<const T*>(a.source) + sample * a.per_sample + s, out, n);
    return;
  }
  const int64_t channels = a.channels, height = a.height, width = a.width;
  if (!a.channels_last) {
    int64_t col = s % width, row = (s / width) % height;
    for (int64_t j = 0; j < n;) {
      const int64_t run = std::min(n - j, width - col);
      row_saliency<T>(a, sample, row, col, run, out + j);
      j += run;
      col = 0;
      row = row + 1 == height ? 0 : row + 1;
    }
    return;
  }
  int64_t channel = s % channels, col = (s / channels) % width, row = s / (channels * width);
  for (int64_t j = 0; j < n;) {
    A value;
    row_saliency<T>(a, sample, row, col, 1, &value);
    const int64_t run = std::min(n - j, channels - channel);
    for (int64_t k = 0; k < run; ++k) out[j + k] = value;
    j += run;
    channel = 0;
    if (++col == width) {
      col = 0;
      ++row;
    }
  }
}

template <typename T>
FASTSAT_ISA_CLONES void sat_task(const SatPerturbArgs& a, uint64_t seed, int64_t sample, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t base = sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const float p = static_cast<float>(a.p);
  A xb[kTile], sb[kTile];
  uint32_t words[kTile];
  for (int64_t s = begin; s < end; s += kTile) {
    const int64_t n = std::min(kTile, end - s);
    const A* xv = view_as(x + s, xb, n);
    fill_saliency<T>(a, sample, s, n, sb);
    fill_words(seed, kStreamSat, sample, s, n, words);
    for (int64_t j = 0; j < n; ++j) sb[j] = sat_value(xv[j], sb[j], words[j], p, eps, lo, hi);
    store(sb, out + s, n);
  }
}

}  // namespace

// --- entry points ------------------------------------------------------------------------------

template <typename T, typename G>
void pgd_step(const PgdStepArgs& args) {
  if (args.stats != nullptr) {
    pgd_step_impl<T, G, true>(args);
  } else {
    pgd_step_impl<T, G, false>(args);
  }
}

template <typename T, typename G>
void alignment_stats(const AlignmentStatsArgs& a) {
  using A = acc_t<T>;
  const Tasks tasks(a.batch, a.per_sample);
  std::vector<double> partial(tasks.count() * 3);
  parallel_tasks(tasks, [&](int64_t t) {
    alignment_task<T, G>(a, tasks.sample(t), tasks.begin(t), tasks.end(t), partial.data() + t * 3);
  });
  const std::vector<double> sums = per_sample_sums(tasks, partial, 3);
  A* stats = static_cast<A*>(a.stats);
  for (int64_t b = 0; b < a.batch; ++b) {
    stats[b * 3 + 0] = static_cast<A>(sums[b * 3 + 0]);
    stats[b * 3 + 1] = static_cast<A>(sqrt(sums[b * 3 + 1]));
    stats[b * 3 + 2] = static_cast<A>(sqrt(sums[b * 3 + 2]));
  }
}

template <typename T>
void random_start(const RandomStartArgs& a) {
  using A = acc_t<T>;
  const Tasks tasks(a.batch, a.per_sample);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  if (!a.l2) {
    parallel_tasks(tasks, [&](int64_t t) { linf_start_task<T>(a, seed, tasks.sample(t), tasks.begin(t), tasks.end(t)); });
    return;
  }
  std::vector<double> partial(tasks.count());
  parallel_tasks(tasks, [&](int64_t t) {
    gaussian_norm_task(seed, tasks.sample(t), tasks.begin(t), tasks.end(t), partial.data() + t);
  });
  const std::vector<double> gaussian_sq = per_sample_sums(tasks, partial, 1);
  std::vector<A> scale(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    scale[b] = static_cast<A>(l2_start_scale(seed, b, a.per_sample, a.eps, gaussian_sq[b]));
  }
  parallel_tasks(tasks, [&](int64_t t) {
    const int64_t b = tasks.sample(t);
    l2_start_task<T>(a, seed, b, tasks.begin(t), tasks.end(t), scale[b]);
  });
}

template <typename T>
void sat_perturb(const SatPerturbArgs& a) {
  const Tasks tasks(a.batch, a.per_sample);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  parallel_tasks(tasks, [&](int64_t t) { sat_task<T>(a, seed, tasks.sample(t), tasks.begin(t), tasks.end(t)); });
}

#define FASTSAT_INSTANTIATE(T)                                    \
  template void pgd_step<T, T>(const PgdStepArgs&);               \
  template void random_start<T>(const RandomStartArgs&);          \
  template void alignment_stats<T, T>(const AlignmentStatsArgs&); \
  template void sat_perturb<T>(const SatPerturbArgs&);
FASTSAT_INSTANTIATE(float)
FASTSAT_INSTANTIATE(double)
FASTSAT_INSTANTIATE(c10::Half)
FASTSAT_INSTANTIATE(c10::BFloat16)
#undef FASTSAT_INSTANTIATE

// A float32 gradient of a 16-bit input.
#define FASTSAT_INSTANTIATE_FLOAT_GRADIENT(T)                         \
  template void pgd_step<T, float>(const PgdStepArgs&);               \
  template void alignment_stats<T, float>(const AlignmentStatsArgs&);
FASTSAT_INSTANTIATE_FLOAT_GRADIENT(c10::Half)
FASTSAT_INSTANTIATE_FLOAT_GRADIENT(c10::BFloat16)
#undef FASTSAT_INSTANTIATE_FLOAT_GRADIENT

}  // namespace fastsat::cpu
