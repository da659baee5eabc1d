// C++ CPU kernels of the fused ops. T is float, double, c10::Half or c10::BFloat16 (explicitly
// instantiated in kernels.cpp); arithmetic in acc_t<T>, one rounding to T at the end. G is the
// gradient's storage type: T, or float for a c10::Half / c10::BFloat16 T (a float32 gradient read
// without rounding it to 16 bits).
#pragma once

#include "common/args.h"

namespace fastsat::cpu {

template <typename T, typename G> void pgd_step(const PgdStepArgs& args);
template <typename T> void random_start(const RandomStartArgs& args);
template <typename T, typename G> void alignment_stats(const AlignmentStatsArgs& args);
template <typename T> void sat_perturb(const SatPerturbArgs& args);

}  // namespace fastsat::cpu
