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

// Each sample one dense block of memory: contiguous, or channels_last for a 4-d tensor.
bool samples_are_dense(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.numel() > 0, name, " must be a non-empty batch (B, ...), got shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(samples_are_dense(t), name, " must be contiguous or channels_last, got strides ", t.strides());
  TORCH_CHECK(t.numel() / t.size(0) <= std::numeric_limits<int32_t>::max(), name,
              " has more than 2^31 - 1 elements per sample");
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the device of x (", x.device(), "), got ", t.device());
  TORCH_CHECK(t.strides() == x.strides(), name, " must have the memory layout of x (strides ", x.strides(),
              "), got ", t.strides());
}

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t per_sample(const at::Tensor& x) { return x.numel() / x.size(0); }

// --- argument structs (pointers filled in per device) ------------------------------------------

PgdStepArgs pgd_step_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                          double step_size, double eps, bool l2, double lo, double hi, const at::Tensor& stats) {
  check_batch(x, "x");
  check_like(grad, "grad", x);
  check_like(x_nat, "x_nat", x);
  check_like(out, "out", x);
  TORCH_CHECK(step_size >= 0 && eps >= 0, "step_size and eps must be >= 0, got ", step_size, " and ", eps);
  TORCH_CHECK(lo <= hi, "clip must have lo <= hi, got (", lo, ", ", hi, ")");
  return PgdStepArgs{x.data_ptr(),  grad.data_ptr(), x_nat.data_ptr(), out.data_ptr(),
                     stats.numel() ? stats.data_ptr() : nullptr,
                     x.size(0),     per_sample(x),   step_size,        eps, lo, hi, l2};
}

at::Tensor stats_tensor(const at::Tensor& x, int64_t columns, bool wanted) {
  return at::empty({wanted ? x.size(0) : 0, wanted ? columns : 0}, x.options().dtype(accumulation_type(x)));
}

RandomStartArgs random_start_args(const at::Tensor& x_nat, const at::Tensor& out, double eps, bool l2, double lo,
                                  double hi, int64_t seed) {
  check_batch(x_nat, "x_nat");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(lo <= hi, "clip must have lo <= hi, got (", lo, ", ", hi, ")");
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  return RandomStartArgs{x_nat.data_ptr(), out.data_ptr(), x_nat.size(0), per_sample(x_nat), eps, lo, hi,
                         static_cast<uint64_t>(seed), l2};
}

AlignmentStatsArgs alignment_stats_args(const at::Tensor& x, const at::Tensor& g, const at::Tensor& stats) {
  check_batch(x, "x");
  check_like(g, "g", x);
  return AlignmentStatsArgs{x.data_ptr(), g.data_ptr(), stats.data_ptr(), x.size(0), per_sample(x)};
}

SatPerturbArgs sat_perturb_args(const at::Tensor& x, const at::Tensor& out, double eps, double p, int64_t seed,
                                double lo, double hi, const std::optional<at::Tensor>& saliency,
                                const std::optional<at::Tensor>& boxes, const std::optional<at::Tensor>& masks) {
  check_batch(x, "x");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(p >= 0 && p <= 1, "p must be in [0, 1], got ", p);
  TORCH_CHECK(lo <= hi, "clip must have lo <= hi, got (", lo, ", ", hi, ")");
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK(saliency.has_value() + boxes.has_value() + masks.has_value() == 1,
              "sat_perturb needs exactly one of saliency, boxes, masks");
  const bool image = x.dim() == 4;
  const int64_t batch = x.size(0);
  SatPerturbArgs a{x.data_ptr(), out.data_ptr(), nullptr, SaliencySource::kDense, batch, per_sample(x),
                   image ? x.size(1) : 0, image ? x.size(2) : 0, image ? x.size(3) : 0,
                   image && !x.is_contiguous(), eps, p, lo, hi, static_cast<uint64_t>(seed)};
  const auto check_plane = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(image, name, " needs x of shape (B, C, H, W), got ", x.sizes());
    TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == 1 && t.size(2) == x.size(2) &&
                    t.size(3) == x.size(3) && t.is_contiguous(),
                name, " must be a contiguous (B, 1, H, W) tensor, got shape ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), name, " must be on the device of x");
  };
  if (saliency.has_value()) {
    const at::Tensor& s = *saliency;
    TORCH_CHECK(s.scalar_type() == x.scalar_type(), "saliency must have the dtype of x");
    if (s.sizes() == x.sizes()) {
      check_like(s, "saliency", x);
    } else {
      check_plane(s, "saliency");
      a.kind = SaliencySource::kPerPixel;
    }
    a.source = s.data_ptr();
  } else if (boxes.has_value()) {
    const at::Tensor& b = *boxes;
    TORCH_CHECK(image, "boxes needs x of shape (B, C, H, W), got ", x.sizes());
    TORCH_CHECK(b.scalar_type() == at::kLong && b.dim() == 2 && b.size(0) == batch && b.size(1) == 4 &&
                    b.is_contiguous(),
                "boxes must be a contiguous int64 (B, 4) tensor, got ", b.scalar_type(), " ", b.sizes());
    TORCH_CHECK(b.device() == x.device(), "boxes must be on the device of x");
    a.kind = SaliencySource::kBoxes;
    a.source = b.data_ptr();
  } else {
    const at::Tensor& m = *masks;
    TORCH_CHECK(m.scalar_type() == at::kByte, "masks must be uint8, got ", m.scalar_type());
    check_plane(m, "masks");
    a.kind = SaliencySource::kMasks;
    a.source = m.data_ptr();
  }
  return a;
}

// --- CPU ---------------------------------------------------------------------------------------

#define FASTSAT_DISPATCH_CPU(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

void check_cpu(const at::Tensor& x) { TORCH_CHECK(x.device().is_cpu(), "expected CPU tensors, got ", x.device()); }

at::Tensor pgd_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                        double step_size, double eps, bool l2, double lo, double hi, bool with_stats) {
  check_cpu(x);
  at::Tensor stats = stats_tensor(x, 4, with_stats);
  const PgdStepArgs args = pgd_step_args(x, grad, x_nat, out, step_size, eps, l2, lo, hi, stats);
  FASTSAT_DISPATCH_CPU(x.scalar_type(), "fastsat::pgd_step", [&] { cpu::pgd_step<scalar_t>(args); });
  return stats;
}

at::Tensor random_start_cpu(const at::Tensor& x_nat, double eps, bool l2, double lo, double hi, int64_t seed) {
  check_cpu(x_nat);
  at::Tensor out = at::empty_like(x_nat);
  const RandomStartArgs args = random_start_args(x_nat, out, eps, l2, lo, hi, seed);
  FASTSAT_DISPATCH_CPU(x_nat.scalar_type(), "fastsat::random_start", [&] { cpu::random_start<scalar_t>(args); });
  return out;
}

at::Tensor alignment_stats_cpu(const at::Tensor& x, const at::Tensor& g) {
  check_cpu(x);
  at::Tensor stats = stats_tensor(x, 3, true);
  const AlignmentStatsArgs args = alignment_stats_args(x, g, stats);
  FASTSAT_DISPATCH_CPU(x.scalar_type(), "fastsat::alignment_stats", [&] { cpu::alignment_stats<scalar_t>(args); });
  return stats;
}

at::Tensor sat_perturb_cpu(const at::Tensor& x, double eps, double p, int64_t seed, double lo, double hi,
                           const std::optional<at::Tensor>& saliency, const std::optional<at::Tensor>& boxes,
                           const std::optional<at::Tensor>& masks) {
  check_cpu(x);
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
      TORCH_CHECK(false, "fastsat CUDA kernels support float16/bfloat16/float32/float64, got ", dtype); \
  }

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "fastsat CUDA kernel failed: ", cudaGetErrorString(err)); }

void check_cuda(const at::Tensor& x) { TORCH_CHECK(x.is_cuda(), "expected CUDA tensors, got ", x.device()); }

at::Tensor workspace(const at::Tensor& x) {
  return at::empty({cuda::workspace_bytes(x.size(0), per_sample(x))}, x.options().dtype(at::kByte));
}

at::Tensor pgd_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_nat, at::Tensor& out,
                         double step_size, double eps, bool l2, double lo, double hi, bool with_stats) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor stats = stats_tensor(x, 4, with_stats);
  const PgdStepArgs args = pgd_step_args(x, grad, x_nat, out, step_size, eps, l2, lo, hi, stats);
  at::Tensor ws = workspace(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x.scalar_type(), [&] { check_launch(cuda::pgd_step<scalar_t>(args, ws.data_ptr(), stream)); });
  return stats;
}

at::Tensor random_start_cuda(const at::Tensor& x_nat, double eps, bool l2, double lo, double hi, int64_t seed) {
  check_cuda(x_nat);
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
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor stats = stats_tensor(x, 3, true);
  const AlignmentStatsArgs args = alignment_stats_args(x, g, stats);
  at::Tensor ws = workspace(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTSAT_DISPATCH_CUDA(x.scalar_type(),
                        [&] { check_launch(cuda::alignment_stats<scalar_t>(args, ws.data_ptr(), stream)); });
  return stats;
}

at::Tensor sat_perturb_cuda(const at::Tensor& x, double eps, double p, int64_t seed, double lo, double hi,
                            const std::optional<at::Tensor>& saliency, const std::optional<at::Tensor>& boxes,
                            const std::optional<at::Tensor>& masks) {
  check_cuda(x);
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
  m.def("random_start(Tensor x_nat, float eps, bool l2, float lo, float hi, int seed) -> Tensor");
  m.def("alignment_stats(Tensor x, Tensor g) -> Tensor");
  m.def("sat_perturb(Tensor x, float eps, float p, int seed, float lo, float hi, Tensor? saliency, "
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
