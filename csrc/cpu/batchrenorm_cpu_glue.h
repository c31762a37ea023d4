// batchrenorm_cpu_glue.h: what the CPU ops share (batchrenorm_cpu.cpp: the forwards and the
// statistics; batchrenorm_cpu_backward.cpp: the backwards): per-channel views, the run-time
// choice of the kernels' instruction set, and the typed calls of the kernels
// (batchrenorm_cpu_kernels.h). batchrenorm_cpu.cpp says how the layouts, the numerics and the
// determinism work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batchrenorm.h"
#include "batchrenorm_checks.h"
#include "batchrenorm_glue.h"
#include "cpu/batchrenorm_cpu_kernels.h"

namespace batchrenorm {
namespace cpu {

using at::Tensor;

constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

// ---------------------------------------------------------------------------------------------
// Per-channel values (argument checks: batchrenorm_checks.h, shared with the CUDA glue).

// A per-channel tensor read in place (a strided one through a contiguous copy), or a constant
// when it is absent: no staging copy per call.
template <typename acc_t>
class ChannelView {
 public:
  ChannelView(const std::optional<Tensor>& t, double fill) : fill_(static_cast<acc_t>(fill)) {
    if (present(t)) {
      keep_ = t->contiguous();
      p_ = keep_.data_ptr<acc_t>();
    }
  }
  ChannelView(const Tensor& t, double fill) : ChannelView(std::optional<Tensor>(t), fill) {}
  acc_t operator[](int64_t c) const { return p_ != nullptr ? p_[c] : fill_; }
  const acc_t* data() const { return p_; }

 private:
  Tensor keep_;
  const acc_t* p_ = nullptr;
  acc_t fill_;
};

// ---------------------------------------------------------------------------------------------
// Run-time choice of the kernels' instruction set.

enum class Isa { kBase, kAvx2, kAvx512 };

// The highest instruction set that (a) this build has, (b) the CPU has, (c) ATen's own CPU
// kernels run with (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers), so that ours
// and ATen's are compared like with like, and (d) BATCHRENORM_CPU_ISA ("base", "avx2") allows:
// it forces a lower one, for the tests of each build.
inline Isa cpu_isa() {
#if defined(BRN_HAVE_X86_KERNELS)
  static const Isa isa = [] {
    const auto level = [](const std::string& name) {
      if (name == "AVX512" || name == "avx512") return Isa::kAvx512;
      if (name == "AVX2" || name == "avx2") return Isa::kAvx2;
      return Isa::kBase;
    };
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      best = Isa::kAvx2;
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        best = Isa::kAvx512;
    }
    best = std::min(best, level(at::get_cpu_capability()));
    if (const char* env = std::getenv("BATCHRENORM_CPU_ISA")) best = std::min(best, level(env));
    return best;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

#if defined(BRN_HAVE_X86_KERNELS)
#define BRN_CALL_KERNEL(...)                                    \
  (cpu_isa() == Isa::kAvx512 ? avx512::__VA_ARGS__              \
   : cpu_isa() == Isa::kAvx2 ? avx2::__VA_ARGS__ : base::__VA_ARGS__)
#else
#define BRN_CALL_KERNEL(...) base::__VA_ARGS__
#endif

template <typename scalar_t>
std::vector<Moments> channel_moments(const Tensor& x, const Geometry& g) {
  std::vector<Moments> out(g.C);
  BRN_CALL_KERNEL(channel_moments<scalar_t>(x.data_ptr<scalar_t>(), g, out.data()));
  return out;
}

// relu_output: undefined, or the tensor that masks dy (Form's kMasked), in dy's layout.
template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// call(std::true_type{}) when relu_output is given (pz), else call(std::false_type{}): the
// kernels' kMasked, picked once per op call.
template <typename F>
void with_relu_mask(const void* pz, const F& call) {
  if (pz != nullptr)
    call(std::true_type{});
  else
    call(std::false_type{});
}

template <typename scalar_t, bool kCentre>
std::vector<GradSums> channel_grad_sums(const Tensor& dy, const Tensor& relu_output,
                                        const Tensor& x, const Geometry& g,
                                        const acc_type<scalar_t>* mean) {
  std::vector<GradSums> out(g.C);
  const scalar_t* pg = dy.data_ptr<scalar_t>();
  const scalar_t* pz = data_or_null<scalar_t>(relu_output);
  const scalar_t* px = x.data_ptr<scalar_t>();
  with_relu_mask(pz, [&](auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    BRN_CALL_KERNEL(channel_grad_sums<scalar_t, kCentre, kMasked>(pg, pz, px, g, mean,
                                                                  out.data()));
  });
  return out;
}

template <typename acc_t>
struct CoeffArrays {  // per channel, in acc_t: m, a, b, k of Form, in one allocation
  std::vector<acc_t> storage;
  acc_t *m, *a, *b, *k;
  // kGrad: every channel is well centred (batchrenorm.h), so the centre may be folded into b
  // (set by the caller, which knows invstd).
  bool fold_grad = false;
  explicit CoeffArrays(int64_t C)
      : storage(4 * C, acc_t(0)), m(storage.data()), a(m + C), b(a + C), k(b + C) {}
};

template <typename scalar_t, Form kForm>
void elementwise(Tensor& out, const Tensor& x, const Tensor& dy, const Tensor& relu_output,
                 const Geometry& g, const CoeffArrays<acc_type<scalar_t>>& co) {
  using acc_t = acc_type<scalar_t>;
  Coeffs<acc_t> c{co.m, co.a, co.b, co.k};
  // rows layout: fold the centre into the constant, out = x * a + (b - m * a) (+ dy * k), so
  // that the loop loads one coefficient vector fewer (m == nullptr tells it so), when every
  // channel is well conditioned. Affine pass: |m * a| <= 16, so x * a stays within 16 of the
  // output's own scale and the fold costs at most ~1e-6 absolute. Gradient pass (fold_grad,
  // set by the caller): every channel well centred, |m * invstd| <= 16 (batchrenorm.h), so
  // |x * a| stays within 16 times
  // |k * mean(dy * xhat)| <= |k| * rms(dy), the output's scale: at most ~16 ulp of it.
  bool fold = false;
  if (kForm == Form::kAffine && g.rows) {
    fold = true;
    for (int64_t i = 0; i < g.C && fold; ++i)
      fold = std::abs(static_cast<double>(co.m[i]) * static_cast<double>(co.a[i])) <= 16.0;
  }
  if (kForm == Form::kGrad && g.rows) fold = co.fold_grad;
  std::vector<acc_t> folded;
  if (fold) {
    folded.resize(g.C);
    for (int64_t i = 0; i < g.C; ++i)
      folded[i] = static_cast<acc_t>(static_cast<double>(co.b[i]) -
                                     static_cast<double>(co.m[i]) * static_cast<double>(co.a[i]));
    c.m = nullptr;
    c.b = folded.data();
  }
  const scalar_t* px = kForm == Form::kScale ? nullptr : x.data_ptr<scalar_t>();
  const scalar_t* pg = kForm == Form::kAffine ? nullptr : dy.data_ptr<scalar_t>();
  const scalar_t* pz = data_or_null<scalar_t>(relu_output);
  scalar_t* po = out.data_ptr<scalar_t>();
  with_relu_mask(pz, [&](auto masked) {
    // The affine pass has no dy to mask (and is never given relu_output).
    constexpr bool kMasked = decltype(masked)::value && kForm != Form::kAffine;
    BRN_CALL_KERNEL(elementwise<scalar_t, kForm, kMasked>(po, px, pg, pz, g, c));
  });
}

}  // namespace cpu
}  // namespace batchrenorm
