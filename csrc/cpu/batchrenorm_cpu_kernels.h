// batchrenorm_cpu_kernels.h: the interface between the CPU ops (batchrenorm_cpu.cpp,
// batchrenorm_cpu_backward.cpp: checks, layouts, per-channel coefficients) and the vectorised
// loops (batchrenorm_cpu_kernels_impl.h).
//
// The loops are compiled three times: namespace `base` for the baseline instruction set, and,
// on x86-64, namespaces `avx2` (AVX2 + FMA + F16C) and `avx512` (AVX-512 F/BW/VL/DQ as well),
// one picked at run time as ATen picks its own (the extension itself is built without -m
// flags, so a wheel runs anywhere). Only plain data crosses this interface.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "batchrenorm.h"

namespace batchrenorm {
namespace cpu {

// float for float / half / bfloat16 input, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The kernels read the two layouts of batchrenorm.h's Geometry (planes and rows) in place.

struct Moments {  // count, mean, M2 = sum((x - mean)^2), in float64
  double n;
  double mean;
  double m2;
};

struct GradSums {  // sum(dy), sum(dy * (x - m)), sum(x - m), in float64
  double dy;
  double dy_xc;
  double xc;
};

// The elementwise passes, with per-channel coefficients m, a, b, k, the same letters as the
// CUDA kernels': a scales the centred x, k scales dy, b is the constant.
//   kAffine: out = (x - m) * a + b
//   kGrad:   out = dy * k + (x - m) * a + b
//   kScale:  out = dy * k
// kMasked (kGrad, kScale, and the gradient sums): dy is read as aten::threshold_backward(dy,
// relu_output, 0) gives it, zero where relu_output <= 0 (a NaN lets dy through): the backward
// of relu(batch_renorm(x)) from ReLU's incoming gradient, without that gradient's masked copy
// (batchrenorm::backward_relu). Unmasked, relu_output is not read (nullptr).
enum class Form { kAffine, kGrad, kScale };

template <typename acc_t>
struct Coeffs {  // arrays of C values each
  const acc_t* m;
  const acc_t* a;
  const acc_t* b;
  const acc_t* k;
};

// The training backward's kGrad coefficients of channels [c0, c1) from their GradSums (sums[c]):
// the glue's formula (batchrenorm_cpu_backward.cpp, grad_coeffs), handed to the fused kernel as
// a plain function and context, into m[c - c0], a, b, k. One call per block of channels, not per
// channel: on a 7 x 7 map the indirect call and its setup were a tenth of the kernel.
template <typename acc_t>
struct GradCoeffFn {
  void (*fn)(const void* ctx, int64_t c0, int64_t c1, const GradSums* sums, acc_t* m, acc_t* a,
             acc_t* b, acc_t* k);
  const void* ctx;
};

// grad_planes_fused's limit on a channel's values (planes): x and dy of one channel, 2 MiB in
// float32, stay in L2 (or L3) between the channel's sums and its dx. Past the L2 the second
// read still comes from L3 rather than memory, so the fused path moves no more bytes than the
// two passes; the limit is for parallelism: beyond it a few channels would leave threads idle
// where the two-pass path splits each plane. At 512 KiB (65,536 values) (16, 64, 112, 112)
// took the two passes and 0.98-1.02x ATen's time; fused, 0.88-0.91x.
constexpr int64_t kFusedGradMaxValues = 262144;

#define BRN_DECLARE_CPU_KERNELS(isa)                                                          \
  namespace isa {                                                                             \
  /* Per-channel mean and M2 of x, into result[C]. */                                         \
  template <typename scalar_t>                                                                \
  void channel_moments(const scalar_t* x, const Geometry& g, Moments* result);                \
  /* Per-channel sums of dy and dy * (x - m) (and of x - m when kCentre), into result[C]. */  \
  template <typename scalar_t, bool kCentre, bool kMasked>                                    \
  void channel_grad_sums(const scalar_t* dy, const scalar_t* relu_output, const scalar_t* x,  \
                         const Geometry& g, const acc_type<scalar_t>* m, GradSums* result);   \
  template <typename scalar_t, Form kForm, bool kMasked>                                      \
  void elementwise(scalar_t* out, const scalar_t* x, const scalar_t* dy,                      \
                   const scalar_t* relu_output, const Geometry& g,                            \
                   const Coeffs<acc_type<scalar_t>>& co);                                     \
  /* planes, training backward, N * S <= kFusedGradMaxValues: per channel, in one task, the   \
     sums of channel_grad_sums<kCentre = true> (into sums[C]), then dx = kGrad from coeffs,     \
     while the channel is still in cache. */                                                   \
  template <typename scalar_t, bool kMasked>                                                  \
  void grad_planes_fused(scalar_t* dx, const scalar_t* dy, const scalar_t* relu_output,       \
                         const scalar_t* x, const Geometry& g, const acc_type<scalar_t>* m,   \
                         GradCoeffFn<acc_type<scalar_t>> coeffs, GradSums* sums);             \
  }

BRN_DECLARE_CPU_KERNELS(base)
#if defined(__x86_64__) && defined(__GNUC__)
#define BRN_HAVE_X86_KERNELS 1
BRN_DECLARE_CPU_KERNELS(avx2)
BRN_DECLARE_CPU_KERNELS(avx512)
#endif
#undef BRN_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace batchrenorm
