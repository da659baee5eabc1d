// CUDA kernels of the fused ops: raw pointers, sizes and a stream; no torch headers, so the .cu
// compiles with plain nvcc. T is float, double, __half or __nv_bfloat16 and G, the gradient's
// storage type, is T or float for a 16-bit T (explicitly instantiated in kernels.cu). Each launcher returns the launch status (cudaGetLastError) for the binding to
// check; `workspace` is device memory of workspace_bytes(batch, per_sample) bytes.
#pragma once

#include <cuda_runtime_api.h>

#include "common/args.h"

namespace fastsat::cuda {

// Scratch space for the per-block partial sums of every op on such a batch.
int64_t workspace_bytes(int64_t batch, int64_t per_sample);

template <typename T, typename G> cudaError_t pgd_step(const PgdStepArgs& args, void* workspace, cudaStream_t stream);
template <typename T> cudaError_t random_start(const RandomStartArgs& args, void* workspace, cudaStream_t stream);
template <typename T, typename G> cudaError_t alignment_stats(const AlignmentStatsArgs& args, void* workspace, cudaStream_t stream);
template <typename T> cudaError_t sat_perturb(const SatPerturbArgs& args, cudaStream_t stream);

}  // namespace fastsat::cuda
