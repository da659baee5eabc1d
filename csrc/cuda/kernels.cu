// CUDA kernels of the fused ops (METHODS.md §2, §4). No torch headers: raw pointers, sizes and a
// stream come from the binding (csrc/bindings.cpp).
//
// Grid: one block of kThreads threads per task = kChunk elements of one sample (blockIdx.x =
// sample · chunks + chunk). Per-sample sums are reduced per block (warp shuffles) into float64
// partials in the workspace and added up per sample in chunk order, so results are deterministic
// (no atomics). A gradient stored in float32 for a 16-bit input (G = float) is read as it is.
// Random numbers: thread-per-Philox-call, four consecutive elements per call, the
// same streams as the CPU kernels (common/math.h). Built with --fmad=false: no contraction, so the
// element formulas round exactly as the reference and the CPU kernels do.
//
// Passes over memory: L∞ pgd_step, L∞ random_start, sat_perturb and alignment_stats one; L2
// pgd_step two (reduction of ‖g‖², ⟨x − x_nat, g⟩, ‖x − x_nat‖²; then the write pass, each block
// first combining its sample's partials); L2 random_start two. Statistics add one tiny kernel
// over the partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/math.h"
#include "cuda/kernels.h"

namespace fastsat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;  // elements per block; a multiple of 4 (whole Philox calls)
constexpr int kPartials = 6;      // float64 partial sums per block in the workspace

// --- storage type <-> arithmetic type ----------------------------------------------------------

template <typename T> __device__ __forceinline__ acc_t<T> load(const T* p) { return static_cast<acc_t<T>>(*p); }
template <> __device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T> __device__ __forceinline__ T round_to(acc_t<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half round_to<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 round_to<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Stores v rounded to T and returns the stored value in the arithmetic type.
template <typename T> __device__ __forceinline__ acc_t<T> store(T* p, acc_t<T> v) {
  const T stored = round_to<T>(v);
  *p = stored;
  return load<T>(&stored);
}

// --- tasks and reductions ----------------------------------------------------------------------

struct Task {
  int64_t sample;
  int64_t begin;
  int64_t end;
};

__host__ __device__ __forceinline__ int64_t chunks_of(int64_t per_sample) { return (per_sample + kChunk - 1) / kChunk; }

__device__ __forceinline__ Task this_task(int64_t per_sample) {
  const int64_t chunks = chunks_of(per_sample);
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) % chunks) * kChunk;
  return Task{static_cast<int64_t>(blockIdx.x) / chunks, begin, begin + kChunk < per_sample ? begin + kChunk : per_sample};
}

struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxPropagatingNaN {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return (a < b || b != b) ? b : a; }
};

// Reduces v over the block; the result is valid in thread 0.
template <typename Op, typename A, int K>
__device__ __forceinline__ void block_reduce(A (&v)[K], Op op) {
  __shared__ A shared[K][kWarps];
  for (int k = 0; k < K; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) v[k] = op(v[k], __shfl_down_sync(0xffffffffu, v[k], offset));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    for (int k = 0; k < K; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) {
      A total = shared[k][0];
      for (int w = 1; w < kWarps; ++w) total = op(total, shared[k][w]);
      v[k] = total;
    }
  }
}

// Sum over the sample's blocks of partial k, in chunk order.
__device__ __forceinline__ double sample_total(const double* partial, int64_t sample, int64_t chunks, int k) {
  double total = 0.0;
  for (int64_t t = sample * chunks; t < (sample + 1) * chunks; ++t) total += partial[t * kPartials + k];
  return total;
}

// --- pgd_step ----------------------------------------------------------------------------------

// Partials: ⟨x_nat, g⟩, ‖g‖², ‖x_nat‖², max |out − x_nat|.
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) linf_step_kernel(PgdStepArgs a, double* partial) {
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  const int64_t base = task.sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A step = static_cast<A>(a.step_size), eps = static_cast<A>(a.eps);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A sums[3] = {A(0), A(0), A(0)};
  A delta_max[1] = {A(0)};
#pragma unroll 4
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    const A xv = load(x + i), gv = load(g + i), nv = load(nat + i);
    const A stored = store(out + i, linf_step(xv, gv, nv, step, eps, lo, hi));
    if constexpr (kStats) {
      sums[0] += nv * gv;
      sums[1] += gv * gv;
      sums[2] += nv * nv;
      delta_max[0] = MaxPropagatingNaN{}(delta_max[0], stored > nv ? stored - nv : nv - stored);
    }
  }
  if constexpr (kStats) {
    block_reduce(sums, Sum{});
    __syncthreads();
    block_reduce(delta_max, MaxPropagatingNaN{});
    if (threadIdx.x == 0) {
      double* p = partial + static_cast<int64_t>(blockIdx.x) * kPartials;
      for (int k = 0; k < 3; ++k) p[k] = static_cast<double>(sums[k]);
      p[3] = static_cast<double>(delta_max[0]);
    }
  }
}

// Partials: ‖g‖², ⟨d, g⟩, ‖d‖² with d = x − x_nat, and for stats ⟨x_nat, g⟩, ‖x_nat‖².
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) l2_reduce_kernel(PgdStepArgs a, double* partial) {
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  const int64_t base = task.sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  A sums[5] = {A(0), A(0), A(0), A(0), A(0)};
#pragma unroll 4
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    const A gv = load(g + i), nv = load(nat + i);
    const A dv = load(x + i) - nv;
    sums[0] += gv * gv;
    sums[1] += dv * gv;
    sums[2] += dv * dv;
    if constexpr (kStats) {
      sums[3] += nv * gv;
      sums[4] += nv * nv;
    }
  }
  block_reduce(sums, Sum{});
  if (threadIdx.x == 0) {
    double* p = partial + static_cast<int64_t>(blockIdx.x) * kPartials;
    for (int k = 0; k < 5; ++k) p[k] = static_cast<double>(sums[k]);
  }
}

// Write pass; partial 5: ‖out − x_nat‖².
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) l2_apply_kernel(PgdStepArgs a, double* partial) {
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  __shared__ A coefficients[2];
  if (threadIdx.x == 0) {
    const int64_t chunks = chunks_of(a.per_sample);
    const double gg = sample_total(partial, task.sample, chunks, 0);
    const double dg = sample_total(partial, task.sample, chunks, 1);
    const double dd = sample_total(partial, task.sample, chunks, 2);
    l2_coefficients(dd, dg, gg, a.step_size, a.eps, coefficients[0], coefficients[1]);
  }
  __syncthreads();
  const A scale = coefficients[0], factor = coefficients[1];
  const int64_t base = task.sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.grad) + base;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A delta_sq[1] = {A(0)};
#pragma unroll 4
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    const A nv = load(nat + i);
    const A stored = store(out + i, l2_step(load(x + i), load(g + i), nv, scale, factor, lo, hi));
    if constexpr (kStats) delta_sq[0] += (stored - nv) * (stored - nv);
  }
  if constexpr (kStats) {
    block_reduce(delta_sq, Sum{});
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * kPartials + 5] = static_cast<double>(delta_sq[0]);
  }
}

// One thread per sample: (batch, 4) statistics from the partials.
template <typename A>
__global__ void pgd_stats_kernel(const double* partial, int64_t batch, int64_t chunks, bool l2, A* stats) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  A* s = stats + b * 4;
  if (l2) {
    s[0] = static_cast<A>(sample_total(partial, b, chunks, 3));
    s[1] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 0)));
    s[2] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 4)));
    s[3] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 5)));
    return;
  }
  double delta_max = 0.0;
  for (int64_t t = b * chunks; t < (b + 1) * chunks; ++t) {
    delta_max = MaxPropagatingNaN{}(delta_max, partial[t * kPartials + 3]);
  }
  s[0] = static_cast<A>(sample_total(partial, b, chunks, 0));
  s[1] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 1)));
  s[2] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 2)));
  s[3] = static_cast<A>(delta_max);
}

// --- alignment_stats ---------------------------------------------------------------------------

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) alignment_reduce_kernel(AlignmentStatsArgs a, double* partial) {
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  const int64_t base = task.sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  const G* g = static_cast<const G*>(a.g) + base;
  A sums[3] = {A(0), A(0), A(0)};
#pragma unroll 4
  for (int64_t i = task.begin + threadIdx.x; i < task.end; i += kThreads) {
    const A xv = load(x + i), gv = load(g + i);
    sums[0] += xv * gv;
    sums[1] += gv * gv;
    sums[2] += xv * xv;
  }
  block_reduce(sums, Sum{});
  if (threadIdx.x == 0) {
    double* p = partial + static_cast<int64_t>(blockIdx.x) * kPartials;
    for (int k = 0; k < 3; ++k) p[k] = static_cast<double>(sums[k]);
  }
}

template <typename A>
__global__ void alignment_stats_kernel(const double* partial, int64_t batch, int64_t chunks, A* stats) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  stats[b * 3 + 0] = static_cast<A>(sample_total(partial, b, chunks, 0));
  stats[b * 3 + 1] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 1)));
  stats[b * 3 + 2] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 2)));
}

// --- random_start ------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) linf_start_kernel(RandomStartArgs a) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  const int64_t base = task.sample * a.per_sample;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  for (int64_t q = task.begin / 4 + threadIdx.x; 4 * q < task.end; q += kThreads) {
    const Words4 r = random_words(seed, kStreamUniform, task.sample, q);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * q + k;
      if (i < task.end) {
        const A delta = (A(2) * static_cast<A>(uniform_co(r.w[k])) - A(1)) * eps;
        store(out + i, clamp_to(load(nat + i) + delta, lo, hi));
      }
    }
  }
}

// Partial 0: squared norm of the sample's Gaussians in this chunk.
__global__ void __launch_bounds__(kThreads) gaussian_norm_kernel(RandomStartArgs a, double* partial) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const Task task = this_task(a.per_sample);
  float sum[1] = {0.0f};
  for (int64_t q = task.begin / 4 + threadIdx.x; 4 * q < task.end; q += kThreads) {
    float z[4];
    gaussians4(seed, task.sample, q, z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (4 * q + k < task.end) sum[0] += z[k] * z[k];
    }
  }
  block_reduce(sum, Sum{});
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * kPartials] = static_cast<double>(sum[0]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) l2_start_kernel(RandomStartArgs a, const double* partial) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  __shared__ A scale_shared;
  if (threadIdx.x == 0) {
    const double norm_sq = sample_total(partial, task.sample, chunks_of(a.per_sample), 0);
    scale_shared = static_cast<A>(l2_start_scale(seed, task.sample, a.per_sample, a.eps, norm_sq));
  }
  __syncthreads();
  const A scale = scale_shared;
  const int64_t base = task.sample * a.per_sample;
  const T* nat = static_cast<const T*>(a.x_nat) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  for (int64_t q = task.begin / 4 + threadIdx.x; 4 * q < task.end; q += kThreads) {
    float z[4];
    gaussians4(seed, task.sample, q, z);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * q + k;
      if (i < task.end) store(out + i, clamp_to(load(nat + i) + static_cast<A>(z[k]) * scale, lo, hi));
    }
  }
}

// --- sat_perturb -------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ acc_t<T> saliency_at(const SatPerturbArgs& a, int64_t sample, int64_t index) {
  using A = acc_t<T>;
  if (a.kind == SaliencySource::kDense) return load(static_cast<const T*>(a.source) + sample * a.per_sample + index);
  // Per-sample sizes fit in 32 bits (checked by the binding).
  const uint32_t i = static_cast<uint32_t>(index), channels = static_cast<uint32_t>(a.channels);
  const uint32_t height = static_cast<uint32_t>(a.height), width = static_cast<uint32_t>(a.width);
  const uint32_t col = a.channels_last ? (i / channels) % width : i % width;
  const uint32_t row = a.channels_last ? i / (channels * width) : (i / width) % height;
  if (a.kind == SaliencySource::kBoxes) {
    return static_cast<A>(box_value(static_cast<const int64_t*>(a.source) + sample * 4, row, col));
  }
  const int64_t pixel = sample * a.height * a.width + static_cast<int64_t>(row) * width + col;
  if (a.kind == SaliencySource::kMasks) return static_cast<const uint8_t*>(a.source)[pixel] ? A(1) : A(-1);
  return load(static_cast<const T*>(a.source) + pixel);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sat_kernel(SatPerturbArgs a) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  using A = acc_t<T>;
  const Task task = this_task(a.per_sample);
  const int64_t base = task.sample * a.per_sample;
  const T* x = static_cast<const T*>(a.x) + base;
  T* out = static_cast<T*>(a.out) + base;
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const float p = static_cast<float>(a.p);
  for (int64_t q = task.begin / 4 + threadIdx.x; 4 * q < task.end; q += kThreads) {
    const Words4 sign = random_words(seed, kStreamSign, task.sample, q);
    const Words4 keep = random_words(seed, kStreamKeep, task.sample, q);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * q + k;
      if (i < task.end) {
        const A s = saliency_at<T>(a, task.sample, i);
        store(out + i, sat_value(load(x + i), s, sign.w[k], keep.w[k], p, eps, lo, hi));
      }
    }
  }
}

unsigned int blocks_for(int64_t batch, int64_t per_sample) {
  return static_cast<unsigned int>(batch * chunks_of(per_sample));
}

unsigned int blocks_per_sample_kernel(int64_t batch) { return static_cast<unsigned int>((batch + kThreads - 1) / kThreads); }

}  // namespace

int64_t workspace_bytes(int64_t batch, int64_t per_sample) {
  return batch * chunks_of(per_sample) * kPartials * static_cast<int64_t>(sizeof(double));
}

template <typename T, typename G>
cudaError_t pgd_step(const PgdStepArgs& a, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  const unsigned int blocks = blocks_for(a.batch, a.per_sample);
  const bool stats = a.stats != nullptr;
  if (!a.l2) {
    if (stats) {
      linf_step_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial);
    } else {
      linf_step_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial);
    }
  } else if (stats) {
    l2_reduce_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial);
    l2_apply_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial);
  } else {
    l2_reduce_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial);
    l2_apply_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial);
  }
  if (stats) {
    pgd_stats_kernel<acc_t<T>><<<blocks_per_sample_kernel(a.batch), kThreads, 0, stream>>>(
        partial, a.batch, chunks_of(a.per_sample), a.l2, static_cast<acc_t<T>*>(a.stats));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t random_start(const RandomStartArgs& a, void* workspace, cudaStream_t stream) {
  const unsigned int blocks = blocks_for(a.batch, a.per_sample);
  if (!a.l2) {
    linf_start_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    double* partial = static_cast<double*>(workspace);
    gaussian_norm_kernel<<<blocks, kThreads, 0, stream>>>(a, partial);
    l2_start_kernel<T><<<blocks, kThreads, 0, stream>>>(a, partial);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t alignment_stats(const AlignmentStatsArgs& a, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  alignment_reduce_kernel<T, G><<<blocks_for(a.batch, a.per_sample), kThreads, 0, stream>>>(a, partial);
  alignment_stats_kernel<acc_t<T>><<<blocks_per_sample_kernel(a.batch), kThreads, 0, stream>>>(
      partial, a.batch, chunks_of(a.per_sample), static_cast<acc_t<T>*>(a.stats));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sat_perturb(const SatPerturbArgs& a, cudaStream_t stream) {
  sat_kernel<T><<<blocks_for(a.batch, a.per_sample), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

#define FASTSAT_INSTANTIATE(T)                                                                  \
  template cudaError_t pgd_step<T, T>(const PgdStepArgs&, void*, cudaStream_t);                 \
  template cudaError_t random_start<T>(const RandomStartArgs&, void*, cudaStream_t);            \
  template cudaError_t alignment_stats<T, T>(const AlignmentStatsArgs&, void*, cudaStream_t);   \
  template cudaError_t sat_perturb<T>(const SatPerturbArgs&, cudaStream_t);
FASTSAT_INSTANTIATE(float)
FASTSAT_INSTANTIATE(double)
FASTSAT_INSTANTIATE(__half)
FASTSAT_INSTANTIATE(__nv_bfloat16)
#undef FASTSAT_INSTANTIATE

// A float32 gradient of a 16-bit input.
#define FASTSAT_INSTANTIATE_FLOAT_GRADIENT(T)                                                   \
  template cudaError_t pgd_step<T, float>(const PgdStepArgs&, void*, cudaStream_t);             \
  template cudaError_t alignment_stats<T, float>(const AlignmentStatsArgs&, void*, cudaStream_t);
FASTSAT_INSTANTIATE_FLOAT_GRADIENT(__half)
FASTSAT_INSTANTIATE_FLOAT_GRADIENT(__nv_bfloat16)
#undef FASTSAT_INSTANTIATE_FLOAT_GRADIENT

}  // namespace fastsat::cuda
