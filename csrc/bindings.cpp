// fastsat._C: the torch.library registration of the fused ops and their thin bindings: argument
// checks (TORCH_CHECK), output allocation, device guard and stream, dtype dispatch. The kernels
// live in cpu/kernels.cpp and cuda/kernels.cu and see only raw pointers and sizes.
//
// The Python layer (fastsat/ops/functional.py) validates arguments with messages naming them and
// hands over contiguous or channels_last tensors; the checks here only guard the kernels' memory
// assumptions for direct calls of torch.ops.fastsat.*.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <limits>

#include "common/args.h"
#include "common/math.h"
#include "cpu/kernels.h"

#ifdef FASTSAT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.h"
#endif

namespace fastsat {
namespace {

// --- checks ------------------------------------------------------------------------------------
// Only what the kernels' memory accesses rely on (shapes, dtypes, devices, layouts, which saliency
// source is given), with the Python layer's message style "<name>: expected <what>, got <what>".
// Scalars (ε, α, p, clip, seed) are validated by the Python layer; they cannot make a kernel read or
// write out of bounds.

// Each sample one dense block of memory: contiguous, or channels_last for a 4-d tensor.
bool samples_are_dense(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

at::ScalarType accumulation_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels' gradient type G is the storage type T of x when the gradient has x's dtype, else
// acc_t<T> (float32 for a 16-bit x; check_like allows nothing else).
bool same_dtype(const at::Tensor& x, const at::Tensor& grad) { return grad.scalar_type() == x.scalar_type(); }

int64_t per_sample(const at::Tensor& x) { return x.numel() / x.size(0); }

void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.numel() > 0, name, ": expected a non-empty batch (B, ...), got shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", dtype);
  TORCH_CHECK(samples_are_dense(t), name, ": expected a contiguous or channels_last tensor, got strides ",
              t.strides());
  TORCH_CHECK(per_sample(t) <= std::numeric_limits<int32_t>::max(), name,
              ": expected at most 2^31 - 1 elements per sample, got ", per_sample(t));
}

// t has the shape, device and strides of x, and its dtype (or, for a gradient, x's accumulation
// dtype: a float32 gradient of a float16/bfloat16 x).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, bool gradient = false) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected the shape of x ", x.sizes(), ", got ", t.sizes());
  const at::ScalarType dtype = x.scalar_type(), accumulation = accumulation_type(dtype);
  if (gradient && accumulation != dtype) {
    TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == accumulation, name, ": expected dtype ", dtype,
                " or ", accumulation, " (x is ", dtype, "), got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, " (that of x), got ", t.scalar_type());
  }
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on the device of x (", x.device(), "), got one on ",
              t.device());
  TORCH_CHECK(t.strides() == x.strides(), name, ": expected the memory layout of x (strides ", x.strides(),
              "), got strides ", t.strides());
}

// The seed: a (1,) int64 tensor on the device of x, read by the kernels through its pointer.
const int64_t* seed_pointer(const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed: expected a (1,) int64 tensor, got ",
              seed.scalar_type(), " of shape ", seed.sizes());
  TORCH_CHECK(seed.device() == x.device(), "seed: expected a tensor on the device of x (", x.device(),
              "), got one on ", seed.device());
  return seed.data_ptr<int64_t>();
}

// --- argument structs (pointers filled in per device) ------------------------------------------

PgdStepArgs pgd_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                          double step_size, double eps, bool l2, double lo, double hi, const at::Tensor& stats) {
  check_batch(x, "x");
  check_like(grad, "grad", x, /*gradient=*/true);
  check_like(x_nat, "x_nat", x);
  check_like(out, "out", x);
  return PgdStepArgs{x.data_ptr(),  grad.data_ptr(), x_nat.data_ptr(), out.data_ptr(),
                     stats.numel() ? stats.data_ptr() : nullptr,
                     x.size(0),     per_sample(x),   step_size,        eps, lo, hi, l2};
}

at::Tensor stats_tensor(const at::Tensor& x, int64_t columns, bool wanted) {
  return at::empty({wanted ? x.size(0) : 0, wanted ? columns : 0},
                   x.options().dtype(accumulation_type(x.scalar_type())));
}

RandomStartArgs random_start_args(const at::Tensor& x_nat, const at::Tensor& out, double eps, bool l2, double lo,
                                  double hi, const at::Tensor& seed) {
  check_batch(x_nat, "x_nat");
  return RandomStartArgs{x_nat.data_ptr(), out.data_ptr(), x_nat.size(0), per_sample(x_nat), eps, lo, hi,
                         seed_pointer(seed, x_nat), l2};
}

AlignmentStatsArgs alignment_stats_args(const at::Tensor& x, const at::Tensor& g, const at::Tensor& stats) {
  check_batch(x, "x");
  check_like(g, "g", x, /*gradient=*/true);
  return AlignmentStatsArgs{x.data_ptr(), g.data_ptr(), stats.data_ptr(), x.size(0), per_sample(x)};
}

SatPerturbArgs sat_perturb_args(const at::Tensor& x, const at::Tensor& out, double eps, double p, const at::Tensor& seed,
                                double lo, double hi, const std::optional<at::Tensor>& saliency,
                                const std::optional<at::Tensor>& boxes, const std::optional<at::Tensor>& masks) {
  check_batch(x, "x");
  const int given = saliency.has_value() + boxes.has_value() + masks.has_value();
  TORCH_CHECK(given == 1, "saliency, boxes, masks: expected exactly one of them, got ", given);
  const bool image = x.dim() == 4;
  const int64_t batch = x.size(0);
  SatPerturbArgs a{x.data_ptr(), out.data_ptr(), nullptr, SaliencySource::kDense, batch, per_sample(x),
                   image ? x.size(1) : 0, image ? x.size(2) : 0, image ? x.size(3) : 0,
                   image && !x.is_contiguous(), eps, p, lo, hi, seed_pointer(seed, x)};
  const auto check_image = [&](const char* name) {
    TORCH_CHECK(image, name, ": expected an x of shape (B, C, H, W) to index, got x of shape ", x.sizes());
  };
  const auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on the device of x (", x.device(),
                "), got one on ", t.device());
  };
  const auto check_plane = [&](const at::Tensor& t, const char* name) {
    check_image(name);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == 1 && t.size(2) == x.size(2) &&
                    t.size(3) == x.size(3) && t.is_contiguous(),
                name, ": expected a contiguous (B, 1, H, W) = (", batch, ", 1, ", x.size(2), ", ", x.size(3),
                ") tensor, got shape ", t.sizes(), " and strides ", t.strides());
    check_device(t, name);
  };
  if (saliency.has_value()) {
    const at::Tensor& s = *saliency;
    TORCH_CHECK(s.scalar_type() == x.scalar_type(), "saliency: expected dtype ", x.scalar_type(), " (that of x), got ",
                s.scalar_type());
    if (s.sizes() == x.sizes()) {
      check_like(s, "saliency", x);
    } else {
      check_plane(s, "saliency");
      a.kind = SaliencySource::kPerPixel;
    }
    a.source = s.data_ptr();
  } else if (boxes.has_value()) {
    const at::Tensor& b = *boxes;
    check_image("boxes");
    TORCH_CHECK(b.scalar_type() == at::kLong && b.dim() == 2 && b.size(0) == batch && b.size(1) == 4 &&
                    b.is_contiguous(),
                "boxes: expected a contiguous int64 (B, 4) = (", batch, ", 4) tensor, got ", b.scalar_type(),
                " of shape ", b.sizes());
    check_device(b, "boxes");
    a.kind = SaliencySource::kBoxes;
    a.source = b.data_ptr();
  } else {
    const at::Tensor& m = *masks;
    TORCH_CHECK(m.scalar_type() == at::kByte, "masks: expected a uint8 tensor, got ", m.scalar_type());
    check_plane(m, "masks");
    a.kind = SaliencySource::kMasks;
    a.source = m.data_ptr();
  }
  return a;
}

// --- CPU ---------------------------------------------------------------------------------------

#define FASTSAT_DISPATCH_CPU(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got one on ", x.device());
}

at::Tensor pgd_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                        double step_size, double eps, bool l2, double lo, double hi, bool with_stats) {
  check_cpu(x, "x");
  at::Tensor stats = stats_tensor(x, 4, with_stats);
  const PgdStepArgs args = pgd_step_args(x, grad, x_nat, out, step_size, eps, l2, lo, hi, stats);
  FASTSAT_DISPATCH_CPU(x.scalar_type(), "fastsat::pgd_step", [&] {
    if (same_dtype(x, grad)) {
      cpu::pgd_step<scalar_t, scalar_t>(args);
    } else {
      cpu::pgd_step<scalar_t, acc_t<scalar_t>>(args);
    }
  });
  return stats;
}

at::Tensor random_start_cpu(const at::Tensor& x_nat, double eps, bool l2, double lo, double hi, const at::Tensor& seed) {
  check_cpu(x_nat, "x_nat");
  at::Tensor out = at::empty_like(x_nat);
  const RandomStartArgs args = random_start_args(x_nat, out, eps, l2, lo, hi, seed);
  FASTSAT_DISPATCH_CPU(x_nat.scalar_type(), "fastsat::random_start", [&] { cpu::random_start<scalar_t>(args); });
  return out;
}

at::Tensor alignment_stats_cpu(const at::Tensor& x, const at::Tensor& g) {
  check_cpu(x, "x");
  at::Tensor stats = stats_tensor(x, 3, true);
  const AlignmentStatsArgs args = alignment_stats_args(x, g, stats);
  FASTSAT_DISPATCH_CPU(x.scalar_type(), "fastsat::alignment_stats", [&] {
    if (same_dtype(x, g)) {
      cpu::alignment_stats<scalar_t, scalar_t>(args);
    } else {
      cpu::alignment_stats<scalar_t, acc_t<scalar_t>>(args);
    }
  });
  return stats;
}

at::Tensor sat_perturb_cpu(const at::Tensor& x, double eps, double p, const at::Tensor& seed, double lo, double hi,
                           const std::optional<at::Tensor>& saliency, const std::optional<at::Tensor>& boxes,
                           const std::optional<at::Tensor>& masks) {
  check_cpu(x, "x");
  at::Tensor out = at::empty_like(x);
  const SatPerturbArgs args = sat_perturb_args(x, out, eps, p, seed, lo, hi, saliency, boxes, masks);
  FASTSAT_DISPATCH_CPU(x.scalar_type(), "fastsat::sat_perturb", [&] { cpu::sat_perturb<scalar_t>(args); });
  return out;
}

// --- CUDA --------------------------------------------------------------------------------------

#ifdef FASTSAT_WITH_CUDA

// The CUDA kernels are instantiated for CUDA's own 16-bit types (same bits as at::Half/BFloat16).
#define FASTSAT_CUDA_CASE(enum_type, cuda_type, ...) \
  case enum_type: {                                  \
    using scalar_t = cuda_type;                      \
    __VA_ARGS__();                                   \
    break;                                           \
  }
#define FASTSAT_DISPATCH_CUDA(dtype, ...)                                               \
  switch (dtype) {                                                                      \
    FASTSAT_CUDA_CASE(at::kFloat, float, __VA_ARGS__)                                   \
    FASTSAT_CUDA_CASE(at::kDouble, double, __VA_ARGS__)                                 \
    FASTSAT_CUDA_CASE(at::kHalf, __half, __VA_ARGS__)                                   \
    FASTSAT_CUDA_CASE(at::kBFloat16, __nv_bfloat16, __VA_ARGS__)                        \
    default:                                                                            \
      TORCH_CHECK(false, "x: expected a float16, bfloat16, float32 or float64 tensor, got ", dtype); \
  }

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "fastsat CUDA kernel failed: ", cudaGetErrorString(err)); }

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor, got one on ", x.device());
}

at::Tensor workspace(const at::Tensor& x) {
  return at::empty({cuda::workspace_bytes(x.size(0), per_sample(x))}, x.options().dtype(at::kByte));
}

at::Tensor pgd_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                         double step_size, double eps, bool l2, double lo, double hi, bool with_stats) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor stats = stats_tensor(x, 4, with_stats);
  const PgdStepArgs args = pgd_step_args(x, grad, x_nat, out, step_size, eps, l2, lo, hi, stats);
  at::Tensor ws = workspace(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x.scalar_type(), [&] {
    check_launch(same_dtype(x, grad) ? cuda::pgd_step<scalar_t, scalar_t>(args, ws.data_ptr(), stream)
                                     : cuda::pgd_step<scalar_t, acc_t<scalar_t>>(args, ws.data_ptr(), stream));
  });
  return stats;
}

at::Tensor random_start_cuda(const at::Tensor& x_nat, double eps, bool l2, double lo, double hi,
                             const at::Tensor& seed) {
  check_cuda(x_nat, "x_nat");
  const c10::cuda::CUDAGuard guard(x_nat.device());
  at::Tensor out = at::empty_like(x_nat);
  const RandomStartArgs args = random_start_args(x_nat, out, eps, l2, lo, hi, seed);
  at::Tensor ws = workspace(x_nat);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x_nat.scalar_type(),
                        [&] { check_launch(cuda::random_start<scalar_t>(args, ws.data_ptr(), stream)); });
  return out;
}

at::Tensor alignment_stats_cuda(const at::Tensor& x, const at::Tensor& g) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor stats = stats_tensor(x, 3, true);
  const AlignmentStatsArgs args = alignment_stats_args(x, g, stats);
  at::Tensor ws = workspace(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x.scalar_type(), [&] {
    check_launch(same_dtype(x, g) ? cuda::alignment_stats<scalar_t, scalar_t>(args, ws.data_ptr(), stream)
                                  : cuda::alignment_stats<scalar_t, acc_t<scalar_t>>(args, ws.data_ptr(), stream));
  });
  return stats;
}

at::Tensor sat_perturb_cuda(const at::Tensor& x, double eps, double p, const at::Tensor& seed, double lo, double hi,
                            const std::optional<at::Tensor>& saliency, const std::optional<at::Tensor>& boxes,
                            const std::optional<at::Tensor>& masks) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const SatPerturbArgs args = sat_perturb_args(x, out, eps, p, seed, lo, hi, saliency, boxes, masks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x.scalar_type(), [&] { check_launch(cuda::sat_perturb<scalar_t>(args, stream)); });
  return out;
}

#endif  // FASTSAT_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsat, m) {
  m.def("pgd_step(Tensor x, Tensor grad, Tensor x_nat, Tensor(a!) out, float step_size, float eps, bool l2, "
        "float lo, float hi, bool with_stats) -> Tensor");
  m.def("random_start(Tensor x_nat, float eps, bool l2, float lo, float hi, Tensor seed) -> Tensor");
  m.def("alignment_stats(Tensor x, Tensor g) -> Tensor");
  m.def("sat_perturb(Tensor x, float eps, float p, Tensor seed, float lo, float hi, Tensor? saliency, "
        "Tensor? boxes, Tensor? masks) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsat, CPU, m) {
  m.impl("pgd_step", &pgd_step_cpu);
  m.impl("random_start", &random_start_cpu);
  m.impl("alignment_stats", &alignment_stats_cpu);
  m.impl("sat_perturb", &sat_perturb_cpu);
}

#ifdef FASTSAT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastsat, CUDA, m) {
  m.impl("pgd_step", &pgd_step_cuda);
  m.impl("random_start", &random_start_cuda);
  m.impl("alignment_stats", &alignment_stats_cuda);
  m.impl("sat_perturb", &sat_perturb_cuda);
}
#endif

}  // namespace fastsat

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastsat C++/CUDA kernels; the ops are registered as torch.ops.fastsat.*";
  module.def("has_cuda", [] {
#ifdef FASTSAT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build has the CUDA kernels.");
}
