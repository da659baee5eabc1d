// Arguments of the fused ops as the kernels receive them: raw pointers and sizes, validated by
// the binding (csrc/bindings.cpp). Plain C++, shared by the CPU and CUDA kernels.
//
// Every tensor is a batch of `batch` samples, each one dense block of `per_sample` elements in
// memory (contiguous or channels_last); outputs have the layout of the input. Element pointers
// have the storage type T the kernel is instantiated for, except the gradient (PgdStepArgs::grad,
// AlignmentStatsArgs::g), which has type G: T or acc_t<T> (float32 for a 16-bit T); statistics
// have type acc_t<T>. The seed is read through a pointer to one int64 on the data's device (a tensor
// torch's own generator may have just filled), so no host ever needs its value.
#pragma once

#include <stdint.h>

namespace fastsat {

struct PgdStepArgs {
  const void* x;
  const void* grad;  // G
  const void* x_nat;
  void* out;    // may alias x (or x_nat): each element is read before it is written
  void* stats;  // (batch, 4): <x_nat, g>, ||g||_2, ||x_nat||_2, ||out - x_nat||_p; nullptr: none
  int64_t batch;
  int64_t per_sample;
  double step_size;
  double eps;
  double lo;
  double hi;
  bool l2;
};

struct RandomStartArgs {
  const void* x_nat;
  void* out;
  int64_t batch;
  int64_t per_sample;
  double eps;
  double lo;
  double hi;
  const int64_t* seed;
  bool l2;
};

struct AlignmentStatsArgs {
  const void* x;
  const void* g;  // G
  void* stats;  // (batch, 3): <x, g>, ||g||_2, ||x||_2
  int64_t batch;
  int64_t per_sample;
};

enum class SaliencySource : int {
  kDense,     // T, the shape and layout of x
  kPerPixel,  // T, (B, 1, H, W) contiguous, broadcast over channels
  kBoxes,     // int64 (B, 4): x0, y0, x1, y1, half-open
  kMasks,     // uint8 (B, 1, H, W) contiguous, nonzero = object
};

struct SatPerturbArgs {
  const void* x;
  void* out;
  const void* source;
  SaliencySource kind;
  int64_t batch;
  int64_t per_sample;
  // (C, H, W) of a 4-d x and its memory order; unused for kDense.
  int64_t channels;
  int64_t height;
  int64_t width;
  bool channels_last;
  double eps;
  double p;
  double lo;
  double hi;
  const int64_t* seed;
};

}  // namespace fastsat
