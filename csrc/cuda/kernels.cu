// CUDA kernels of the fused ops (METHODS.md §2, §4). No torch headers: raw pointers, sizes and a
// stream come from the binding (csrc/bindings.cpp).
//
// Work: tasks of kChunk elements of one sample (task = sample · chunks + chunk), one block of
// kThreads threads per task, the blocks walking the tasks in a grid-stride loop (a grid of at most
// kBlocksPerSM blocks per multiprocessor). Per-sample sums are reduced per block (warp shuffles)
// into float64 partials in the workspace and added up per sample in chunk order, so results are
// deterministic (no atomics). A gradient stored in float32 for a 16-bit input (G = float) is read
// as it is. Built with --fmad=false: no contraction, so the element formulas round exactly as the
// reference and the CPU kernels do.
//
// Memory access: every pointer is `__restrict__` and every element is read by the thread that
// writes it, before it writes it, so an `out` that is exactly `x` or `x_nat` (an in-place update,
// the only overlap the Python layer allows) is still safe. When every base pointer is 16-byte
// aligned (checked at launch), each thread moves 16 bytes per load and store (4 floats, 8 halves):
// a task's range is split into a scalar head up to the first 16-byte boundary, a vectorised body
// and a scalar tail, so any per-sample size and either layout (contiguous or channels_last: each
// sample is one dense block either way) takes the vector path for all but a few elements.
// Random numbers: thread-per-Philox-call, the four words of call q for the four elements 4q..4q+3
// of a sample (one 4-element load and store), the same streams as the CPU kernels (common/math.h).
//
// Passes over memory: L∞ pgd_step, L∞ random_start, sat_perturb and alignment_stats one; L2
// pgd_step: a sample of at most kChunk elements (CIFAR: 3·32·32) in one kernel — one block reduces
// ‖g‖², ⟨x − x_nat, g⟩, ‖x − x_nat‖², derives the step and writes it, re-reading its 12 kB-per-tensor
// sample from cache, statistics included; larger samples two kernels (reduction, then the write
// pass with each block first combining its sample's partials). L2 random_start two. Statistics of
// the multi-pass paths add one tiny kernel over the partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "common/math.h"
#include "cuda/kernels.h"

namespace fastsat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 8192;  // elements per task; a multiple of 4 (whole Philox calls) and of 8 (vectors)
constexpr int kPartials = 6;      // float64 partial sums per task in the workspace
constexpr int kBlocksPerSM = 8;   // grid of the grid-stride loops: 8 × 256 threads fill a multiprocessor
constexpr int kVectorBytes = 16;

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

// K consecutive elements as one aligned access (K · sizeof(T) ≤ 16 bytes).
template <typename T, int K> struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

// Elements [p, p + K) in the arithmetic type; one vector load for K > 1 (p aligned to K elements).
template <int K, typename T> __device__ __forceinline__ void load_n(const T* __restrict__ p, acc_t<T> (&out)[K]) {
  if constexpr (K == 1) {
    out[0] = load(p);
  } else {
    const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = load(&pack.v[k]);
  }
}

// Stores v rounded to T (one vector store for K > 1) and returns the stored values in `stored`.
template <int K, typename T>
__device__ __forceinline__ void store_n(T* __restrict__ p, const acc_t<T> (&v)[K], acc_t<T> (&stored)[K]) {
  Pack<T, K> pack;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    pack.v[k] = round_to<T>(v[k]);
    stored[k] = load(&pack.v[k]);
  }
  if constexpr (K == 1) {
    *p = pack.v[0];
  } else {
    *reinterpret_cast<Pack<T, K>*>(p) = pack;
  }
}

template <int K> struct Width {
  static constexpr int value = K;
};

// Elements per 16-byte access of the widest of the element types.
template <typename T, typename G = T>
constexpr int vector_width() { return kVectorBytes / (sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G)); }

// Runs f(i, Width<K>{}) over the elements [begin, end) of the sample starting at element `base`,
// each thread taking K = 1 or N consecutive elements at a time: a scalar head up to the first
// multiple of N (counted from the 16-byte aligned start of the tensors), N-wide vectors, a scalar
// tail. Without `vectorize` (a pointer not 16-byte aligned) every element is scalar.
template <int N, typename F>
__device__ __forceinline__ void for_elements(int64_t base, int64_t begin, int64_t end, bool vectorize, F&& f) {
  if (!vectorize) {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) f(i, Width<1>{});
    return;
  }
  const int64_t misaligned = (base + begin) % N;
  const int64_t head_end = min(end, begin + (misaligned ? N - misaligned : 0));
  const int64_t body_end = head_end + (end - head_end) / N * N;
  for (int64_t i = begin + threadIdx.x; i < head_end; i += kThreads) f(i, Width<1>{});
  for (int64_t i = head_end + threadIdx.x * N; i < body_end; i += kThreads * N) f(i, Width<N>{});
  for (int64_t i = body_end + threadIdx.x; i < end; i += kThreads) f(i, Width<1>{});
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

// --- tasks and reductions ----------------------------------------------------------------------

struct Task {
  int64_t sample;
  int64_t begin;
  int64_t end;
};

__host__ __device__ __forceinline__ int64_t chunks_of(int64_t per_sample) { return (per_sample + kChunk - 1) / kChunk; }

__device__ __forceinline__ Task task_of(int64_t task, int64_t per_sample) {
  const int64_t chunks = chunks_of(per_sample);
  const int64_t begin = (task % chunks) * kChunk;
  return Task{task / chunks, begin, begin + kChunk < per_sample ? begin + kChunk : per_sample};
}

// The grid-stride loop over the tasks of a batch: `for (int64_t t = first_task(); t < tasks; t += task_stride())`.
__device__ __forceinline__ int64_t first_task() { return blockIdx.x; }
__device__ __forceinline__ int64_t task_stride() { return gridDim.x; }

struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxPropagatingNaN {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return (a < b || b != b) ? b : a; }
};

// Reduces v over the block; the result is valid in thread 0. Ends with the block synchronised, so
// it may be called again (the next task of a grid-stride loop) at once.
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
  __syncthreads();
}

// Sum over the sample's tasks of partial k, in chunk order.
__device__ __forceinline__ double sample_total(const double* __restrict__ partial, int64_t sample, int64_t chunks,
                                               int k) {
  double total = 0.0;
  for (int64_t t = sample * chunks; t < (sample + 1) * chunks; ++t) total += partial[t * kPartials + k];
  return total;
}

// --- pgd_step ----------------------------------------------------------------------------------

// Partials: ⟨x_nat, g⟩, ‖g‖², ‖x_nat‖², max |out − x_nat|.
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) linf_step_kernel(PgdStepArgs a, double* __restrict__ partial,
                                                             bool vectorize) {
  using A = acc_t<T>;
  constexpr int N = vector_width<T, G>();
  const A step = static_cast<A>(a.step_size), eps = static_cast<A>(a.eps);
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    const int64_t base = task.sample * a.per_sample;
    const T* __restrict__ x = static_cast<const T*>(a.x) + base;
    const G* __restrict__ g = static_cast<const G*>(a.grad) + base;
    const T* __restrict__ nat = static_cast<const T*>(a.x_nat) + base;
    T* __restrict__ out = static_cast<T*>(a.out) + base;
    A sums[3] = {A(0), A(0), A(0)};
    A delta_max[1] = {A(0)};
    for_elements<N>(base, task.begin, task.end, vectorize, [&](int64_t i, auto width) {
      constexpr int K = decltype(width)::value;
      A xv[K], nv[K], nw[K], stored[K];
      acc_t<G> gv[K];
      load_n<K>(x + i, xv);
      load_n<K>(g + i, gv);
      load_n<K>(nat + i, nv);
#pragma unroll
      for (int k = 0; k < K; ++k) nw[k] = linf_step(xv[k], static_cast<A>(gv[k]), nv[k], step, eps, lo, hi);
      store_n<K>(out + i, nw, stored);
      if constexpr (kStats) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const A gk = static_cast<A>(gv[k]);
          sums[0] += nv[k] * gk;
          sums[1] += gk * gk;
          sums[2] += nv[k] * nv[k];
          delta_max[0] = MaxPropagatingNaN{}(delta_max[0], stored[k] > nv[k] ? stored[k] - nv[k] : nv[k] - stored[k]);
        }
      }
    });
    if constexpr (kStats) {
      block_reduce(sums, Sum{});
      block_reduce(delta_max, MaxPropagatingNaN{});
      if (threadIdx.x == 0) {
        double* p = partial + t * kPartials;
        for (int k = 0; k < 3; ++k) p[k] = static_cast<double>(sums[k]);
        p[3] = static_cast<double>(delta_max[0]);
      }
    }
  }
}

// Sums of the L2 reduction over [begin, end) of a sample: ‖g‖², ⟨d, g⟩, ‖d‖² with d = x − x_nat,
// and for stats ⟨x_nat, g⟩, ‖x_nat‖²; reduced over the block (valid in thread 0).
template <typename T, typename G, bool kStats>
__device__ __forceinline__ void l2_sums(const PgdStepArgs& a, int64_t base, int64_t begin, int64_t end, bool vectorize,
                                        acc_t<T> (&sums)[5]) {
  using A = acc_t<T>;
  constexpr int N = vector_width<T, G>();
  const T* __restrict__ x = static_cast<const T*>(a.x) + base;
  const G* __restrict__ g = static_cast<const G*>(a.grad) + base;
  const T* __restrict__ nat = static_cast<const T*>(a.x_nat) + base;
  for (int k = 0; k < 5; ++k) sums[k] = A(0);
  for_elements<N>(base, begin, end, vectorize, [&](int64_t i, auto width) {
    constexpr int K = decltype(width)::value;
    A xv[K], nv[K];
    acc_t<G> gv[K];
    load_n<K>(x + i, xv);
    load_n<K>(g + i, gv);
    load_n<K>(nat + i, nv);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A gk = static_cast<A>(gv[k]);
      const A dv = xv[k] - nv[k];
      sums[0] += gk * gk;
      sums[1] += dv * gk;
      sums[2] += dv * dv;
      if constexpr (kStats) {
        sums[3] += nv[k] * gk;
        sums[4] += nv[k] * nv[k];
      }
    }
  });
  block_reduce(sums, Sum{});
}

// The L2 write pass over [begin, end) of a sample with its coefficients; returns ‖out − x_nat‖²
// over the range, reduced over the block (valid in thread 0), when kStats.
template <typename T, typename G, bool kStats>
__device__ __forceinline__ acc_t<T> l2_write(const PgdStepArgs& a, int64_t base, int64_t begin, int64_t end,
                                             bool vectorize, acc_t<T> scale, acc_t<T> factor) {
  using A = acc_t<T>;
  constexpr int N = vector_width<T, G>();
  const T* __restrict__ x = static_cast<const T*>(a.x) + base;
  const G* __restrict__ g = static_cast<const G*>(a.grad) + base;
  const T* __restrict__ nat = static_cast<const T*>(a.x_nat) + base;
  T* __restrict__ out = static_cast<T*>(a.out) + base;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  A delta_sq[1] = {A(0)};
  for_elements<N>(base, begin, end, vectorize, [&](int64_t i, auto width) {
    constexpr int K = decltype(width)::value;
    A xv[K], nv[K], nw[K], stored[K];
    acc_t<G> gv[K];
    load_n<K>(x + i, xv);
    load_n<K>(g + i, gv);
    load_n<K>(nat + i, nv);
#pragma unroll
    for (int k = 0; k < K; ++k) nw[k] = l2_step(xv[k], static_cast<A>(gv[k]), nv[k], scale, factor, lo, hi);
    store_n<K>(out + i, nw, stored);
    if constexpr (kStats) {
#pragma unroll
      for (int k = 0; k < K; ++k) delta_sq[0] += (stored[k] - nv[k]) * (stored[k] - nv[k]);
    }
  });
  if constexpr (kStats) block_reduce(delta_sq, Sum{});
  return delta_sq[0];
}

// Multi-pass L2, pass 1 (samples of more than kChunk elements). Partials: ‖g‖², ⟨d, g⟩, ‖d‖²,
// ⟨x_nat, g⟩, ‖x_nat‖².
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) l2_reduce_kernel(PgdStepArgs a, double* __restrict__ partial,
                                                             bool vectorize) {
  using A = acc_t<T>;
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    A sums[5];
    l2_sums<T, G, kStats>(a, task.sample * a.per_sample, task.begin, task.end, vectorize, sums);
    if (threadIdx.x == 0) {
      for (int k = 0; k < 5; ++k) partial[t * kPartials + k] = static_cast<double>(sums[k]);
    }
  }
}

// Multi-pass L2, pass 2: the write pass; partial 5: ‖out − x_nat‖².
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) l2_apply_kernel(PgdStepArgs a, double* __restrict__ partial,
                                                            bool vectorize) {
  using A = acc_t<T>;
  __shared__ A coefficients[2];
  const int64_t chunks = chunks_of(a.per_sample);
  const int64_t tasks = a.batch * chunks;
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    if (threadIdx.x == 0) {
      const double gg = sample_total(partial, task.sample, chunks, 0);
      const double dg = sample_total(partial, task.sample, chunks, 1);
      const double dd = sample_total(partial, task.sample, chunks, 2);
      l2_coefficients(dd, dg, gg, a.step_size, a.eps, coefficients[0], coefficients[1]);
    }
    __syncthreads();
    const A scale = coefficients[0], factor = coefficients[1];
    __syncthreads();  // every thread has read them before the next task's thread 0 overwrites them
    const A delta_sq = l2_write<T, G, kStats>(a, task.sample * a.per_sample, task.begin, task.end, vectorize, scale,
                                              factor);
    if (kStats && threadIdx.x == 0) partial[t * kPartials + 5] = static_cast<double>(delta_sq);
  }
}

// One-pass L2 for samples of at most kChunk elements (a CIFAR sample): one block per sample reduces,
// derives the step, writes it (re-reading the sample from cache) and, with stats, writes the
// sample's (4) statistics directly — one launch instead of reduce + finalise + apply.
template <typename T, typename G, bool kStats>
__global__ void __launch_bounds__(kThreads) l2_fused_kernel(PgdStepArgs a, bool vectorize) {
  using A = acc_t<T>;
  __shared__ A coefficients[2];
  for (int64_t b = first_task(); b < a.batch; b += task_stride()) {
    const int64_t base = b * a.per_sample;
    A sums[5];
    l2_sums<T, G, kStats>(a, base, 0, a.per_sample, vectorize, sums);
    if (threadIdx.x == 0) {
      l2_coefficients(static_cast<double>(sums[2]), static_cast<double>(sums[1]), static_cast<double>(sums[0]),
                      a.step_size, a.eps, coefficients[0], coefficients[1]);
    }
    __syncthreads();
    const A scale = coefficients[0], factor = coefficients[1];
    __syncthreads();
    const A delta_sq = l2_write<T, G, kStats>(a, base, 0, a.per_sample, vectorize, scale, factor);
    if (kStats && threadIdx.x == 0) {
      A* s = static_cast<A*>(a.stats) + b * 4;
      s[0] = static_cast<A>(static_cast<double>(sums[3]));
      s[1] = static_cast<A>(sqrt(static_cast<double>(sums[0])));
      s[2] = static_cast<A>(sqrt(static_cast<double>(sums[4])));
      s[3] = static_cast<A>(sqrt(static_cast<double>(delta_sq)));
    }
  }
}

// One thread per sample: (batch, 4) statistics from the partials.
template <typename A>
__global__ void pgd_stats_kernel(const double* __restrict__ partial, int64_t batch, int64_t chunks, bool l2,
                                 A* __restrict__ stats) {
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
__global__ void __launch_bounds__(kThreads) alignment_reduce_kernel(AlignmentStatsArgs a, double* __restrict__ partial,
                                                                    bool vectorize) {
  using A = acc_t<T>;
  constexpr int N = vector_width<T, G>();
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    const int64_t base = task.sample * a.per_sample;
    const T* __restrict__ x = static_cast<const T*>(a.x) + base;
    const G* __restrict__ g = static_cast<const G*>(a.g) + base;
    A sums[3] = {A(0), A(0), A(0)};
    for_elements<N>(base, task.begin, task.end, vectorize, [&](int64_t i, auto width) {
      constexpr int K = decltype(width)::value;
      A xv[K];
      acc_t<G> gv[K];
      load_n<K>(x + i, xv);
      load_n<K>(g + i, gv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const A gk = static_cast<A>(gv[k]);
        sums[0] += xv[k] * gk;
        sums[1] += gk * gk;
        sums[2] += xv[k] * xv[k];
      }
    });
    block_reduce(sums, Sum{});
    if (threadIdx.x == 0) {
      for (int k = 0; k < 3; ++k) partial[t * kPartials + k] = static_cast<double>(sums[k]);
    }
  }
}

template <typename A>
__global__ void alignment_stats_kernel(const double* __restrict__ partial, int64_t batch, int64_t chunks,
                                       A* __restrict__ stats) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  stats[b * 3 + 0] = static_cast<A>(sample_total(partial, b, chunks, 0));
  stats[b * 3 + 1] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 1)));
  stats[b * 3 + 2] = static_cast<A>(sqrt(sample_total(partial, b, chunks, 2)));
}

// --- random numbers: one Philox call, four elements ---------------------------------------------

// Runs f(q, first, count, vector) for the Philox calls q of a task: elements first .. first+count-1
// (count < 4 only at the end of a sample), `vector` when they are 4 whole, aligned elements (the
// sample starts on a multiple of 4 elements and the tensors are 16-byte aligned).
template <typename F>
__device__ __forceinline__ void for_calls(const Task& task, int64_t base, bool vectorize, F&& f) {
  const bool aligned4 = vectorize && base % 4 == 0;
  for (int64_t q = task.begin / 4 + threadIdx.x; 4 * q < task.end; q += kThreads) {
    const int64_t first = 4 * q;
    const int64_t count = task.end - first < 4 ? task.end - first : 4;
    f(q, first, count, aligned4 && count == 4);
  }
}

// out[first .. first+count) = clip(value(k, nat[k])) for the call's elements, 4-wide when `vector`.
template <typename T, typename F>
__device__ __forceinline__ void write_call(const T* __restrict__ nat, T* __restrict__ out, int64_t first,
                                           int64_t count, bool vector, F&& value) {
  using A = acc_t<T>;
  if (vector) {
    // Accesses of at most 16 bytes (the alignment checked at launch): one of 4 floats or halves,
    // two of 2 doubles.
    constexpr int V = 4 * sizeof(T) <= kVectorBytes ? 4 : kVectorBytes / sizeof(T);
#pragma unroll
    for (int part = 0; part < 4; part += V) {
      A nv[V], nw[V], stored[V];
      load_n<V>(nat + first + part, nv);
#pragma unroll
      for (int k = 0; k < V; ++k) nw[k] = value(part + k, nv[k]);
      store_n<V>(out + first + part, nw, stored);
    }
    return;
  }
  for (int k = 0; k < count; ++k) {
    A nv[1], nw[1], stored[1];
    load_n<1>(nat + first + k, nv);
    nw[0] = value(k, nv[0]);
    store_n<1>(out + first + k, nw, stored);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) linf_start_kernel(RandomStartArgs a, bool vectorize) {
  using A = acc_t<T>;
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    const int64_t base = task.sample * a.per_sample;
    const T* __restrict__ nat = static_cast<const T*>(a.x_nat) + base;
    T* __restrict__ out = static_cast<T*>(a.out) + base;
    for_calls(task, base, vectorize, [&](int64_t q, int64_t first, int64_t count, bool vector) {
      const Words4 r = random_words(seed, kStreamUniform, task.sample, q);
      write_call(nat, out, first, count, vector, [&](int k, A nv) {
        const A delta = (A(2) * static_cast<A>(uniform_co(r.w[k])) - A(1)) * eps;
        return clamp_to(nv + delta, lo, hi);
      });
    });
  }
}

// Partial 0: squared norm of the sample's Gaussians in this task.
__global__ void __launch_bounds__(kThreads) gaussian_norm_kernel(RandomStartArgs a, double* __restrict__ partial) {
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
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
    if (threadIdx.x == 0) partial[t * kPartials] = static_cast<double>(sum[0]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) l2_start_kernel(RandomStartArgs a, const double* __restrict__ partial,
                                                            bool vectorize) {
  using A = acc_t<T>;
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  __shared__ A scale_shared;
  const A lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    if (threadIdx.x == 0) {
      const double norm_sq = sample_total(partial, task.sample, chunks_of(a.per_sample), 0);
      scale_shared = static_cast<A>(l2_start_scale(seed, task.sample, a.per_sample, a.eps, norm_sq));
    }
    __syncthreads();
    const A scale = scale_shared;
    __syncthreads();
    const int64_t base = task.sample * a.per_sample;
    const T* __restrict__ nat = static_cast<const T*>(a.x_nat) + base;
    T* __restrict__ out = static_cast<T*>(a.out) + base;
    for_calls(task, base, vectorize, [&](int64_t q, int64_t first, int64_t count, bool vector) {
      float z[4];
      gaussians4(seed, task.sample, q, z);
      write_call(nat, out, first, count, vector,
                 [&](int k, A nv) { return clamp_to(nv + static_cast<A>(z[k]) * scale, lo, hi); });
    });
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
__global__ void __launch_bounds__(kThreads) sat_kernel(SatPerturbArgs a, bool vectorize) {
  using A = acc_t<T>;
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const A eps = static_cast<A>(a.eps), lo = static_cast<A>(a.lo), hi = static_cast<A>(a.hi);
  const float p = static_cast<float>(a.p);
  const int64_t tasks = a.batch * chunks_of(a.per_sample);
  for (int64_t t = first_task(); t < tasks; t += task_stride()) {
    const Task task = task_of(t, a.per_sample);
    const int64_t base = task.sample * a.per_sample;
    const T* __restrict__ x = static_cast<const T*>(a.x) + base;
    T* __restrict__ out = static_cast<T*>(a.out) + base;
    for_calls(task, base, vectorize, [&](int64_t q, int64_t first, int64_t count, bool vector) {
      const Words4 r = random_words(seed, kStreamSat, task.sample, q);
      write_call(x, out, first, count, vector, [&](int k, A xv) {
        return sat_value(xv, saliency_at<T>(a, task.sample, first + k), r.w[k], p, eps, lo, hi);
      });
    });
  }
}

// --- launch ------------------------------------------------------------------------------------

// Blocks of a grid-stride launch over `tasks` tasks: enough to fill the GPU, never more than tasks.
unsigned int grid_for(int64_t tasks) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  return static_cast<unsigned int>(tasks < cap ? tasks : cap);
}

unsigned int tasks_grid(int64_t batch, int64_t per_sample) { return grid_for(batch * chunks_of(per_sample)); }

unsigned int blocks_per_sample_kernel(int64_t batch) { return static_cast<unsigned int>((batch + kThreads - 1) / kThreads); }

}  // namespace

int64_t workspace_bytes(int64_t batch, int64_t per_sample) {
  return batch * chunks_of(per_sample) * kPartials * static_cast<int64_t>(sizeof(double));
}

template <typename T, typename G>
cudaError_t pgd_step(const PgdStepArgs& a, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  const unsigned int blocks = tasks_grid(a.batch, a.per_sample);
  const bool stats = a.stats != nullptr;
  const bool vectorize = aligned(a.x) && aligned(a.grad) && aligned(a.x_nat) && aligned(a.out);
  if (!a.l2) {
    if (stats) {
      linf_step_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
    } else {
      linf_step_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
    }
  } else if (chunks_of(a.per_sample) == 1) {
    // One launch, statistics included.
    if (stats) {
      l2_fused_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, vectorize);
    } else {
      l2_fused_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, vectorize);
    }
    return cudaGetLastError();
  } else if (stats) {
    l2_reduce_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
    l2_apply_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
  } else {
    l2_reduce_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
    l2_apply_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
  }
  if (stats) {
    pgd_stats_kernel<acc_t<T>><<<blocks_per_sample_kernel(a.batch), kThreads, 0, stream>>>(
        partial, a.batch, chunks_of(a.per_sample), a.l2, static_cast<acc_t<T>*>(a.stats));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t random_start(const RandomStartArgs& a, void* workspace, cudaStream_t stream) {
  const unsigned int blocks = tasks_grid(a.batch, a.per_sample);
  const bool vectorize = aligned(a.x_nat) && aligned(a.out);
  if (!a.l2) {
    linf_start_kernel<T><<<blocks, kThreads, 0, stream>>>(a, vectorize);
  } else {
    double* partial = static_cast<double*>(workspace);
    gaussian_norm_kernel<<<blocks, kThreads, 0, stream>>>(a, partial);
    l2_start_kernel<T><<<blocks, kThreads, 0, stream>>>(a, partial, vectorize);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t alignment_stats(const AlignmentStatsArgs& a, void* workspace, cudaStream_t stream) {
  double* partial = static_cast<double*>(workspace);
  const bool vectorize = aligned(a.x) && aligned(a.g);
  alignment_reduce_kernel<T, G><<<tasks_grid(a.batch, a.per_sample), kThreads, 0, stream>>>(a, partial, vectorize);
  alignment_stats_kernel<acc_t<T>><<<blocks_per_sample_kernel(a.batch), kThreads, 0, stream>>>(
      partial, a.batch, chunks_of(a.per_sample), static_cast<acc_t<T>*>(a.stats));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sat_perturb(const SatPerturbArgs& a, cudaStream_t stream) {
  const bool vectorize = aligned(a.x) && aligned(a.out);
  sat_kernel<T><<<tasks_grid(a.batch, a.per_sample), kThreads, 0, stream>>>(a, vectorize);
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
