// batchrenorm_cuda.h: the torch-free interface between the CUDA glue (batchrenorm_cuda_glue.h)
// and the kernels (batchrenorm_*.cu). Nothing here includes a torch header, so the kernels
// compile with a plain `nvcc -c` (.ci/check_cuda_kernels).
//
// One params struct per kernel family (StatsParams, GradParams, ElementwiseParams), filled once
// by the glue with raw pointers, sizes and scalars, and passed to the kernel as it is (the
// kernel casts the pointers to its dtype). A reduction is planned once per call: plan_*()
// chooses the regime and the grid from the shape, the dtype and the device's properties
// (cached per device; nothing is read back from the GPU) and says how much workspace it needs;
// the glue allocates that from the caching allocator and calls launch_*() with the same plan.
// Every launcher launches exactly one kernel on params.stream and returns its cudaError_t.
//
// Tensors are seen as (N, C, S) in one of the two dense layouts of batchrenorm.h's Geometry:
// planes (NCHW) or rows (NHWC, channels_last, and a contiguous (N, C) input, whose S is 1).
// Per-channel tensors (weight, bias, buffers, statistics) are float, or double for double
// input ("stat type"), contiguous, of length C.
//
// Regimes of the reductions (batchrenorm_plan.cu chooses; the kernels say how they work):
//   kResident   each CTA (or a team of warps) holds whole channels' values (NCHW) or a tile of
//               channels over all rows (NHWC) in registers and shared memory: statistics,
//               coefficients, buffer update and output in one ordinary launch, no grid barrier;
//               x (and dy) read once, y (dx) written once. batchrenorm_onchip.cu.
//   kPersistent the same tiles split over several CTAs along the reduced axis, kept on chip
//               across one grid barrier of a cooperative launch; read once. batchrenorm_onchip.cu.
//   kStreaming  what does not fit on chip: partials, a grid barrier, a merge, and (for y / dx)
//               a second barrier and a second read of x (dy). batchrenorm_streaming.cu.
// Workspace: per-CTA partials, each written before it is read in the same launch, so never
// initialised. The resident forward with a step counter also needs `ticket`: an unsigned int
// that is zero before the launch and zero again after it (the kernel counts its CTAs on it and
// the last one resets it), which the glue keeps per device and stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "batchrenorm.h"

namespace batchrenorm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };


// forward_train (train == true): y, and mean / invstd / r / d (length C), from x; updates
// running_mean / running_var (both or neither: nullptr = no running statistics, r = 1, d = 0)
// and increments *num_batches_tracked (when given and there are running statistics), reading
// the step for the clip bounds on the device.
// batch_stats (train == false): mean and m2 = sum((x - mean)^2) per channel; y and every
// training field unused.
struct StatsParams {
  DType dtype;
  Geometry layout;
  bool train;
  const void* x;
  void* y;
  const void* weight;            // nullable
  const void* bias;              // nullable
  void* running_mean;            // nullable
  void* running_var;             // nullable
  int64_t* num_batches_tracked;  // nullable
  unsigned* ticket;              // see above; needed when num_batches_tracked is given
  bool cumulative;               // momentum None: factor 1 / (step + 1)
  double momentum;
  double eps;
  RenormSchedule schedule;
  void* mean;
  void* invstd;  // train
  void* m2;      // batch_stats
  void* r;       // train
  void* d;       // train
  cudaStream_t stream;
};

// backward (reduce_only == false):
//   dx = w*r*invstd * (dy - [mean(dy) + xhat * mean(dy * xhat)]), the bracket only when
//   through_stats (the statistics were this batch's, so the gradient flows through them);
//   grad_weight = r * sum(dy * xhat) + d * sum(dy); grad_bias = sum(dy).
//   dx / grad_weight / grad_bias nullptr: not computed. weight, r, d nullptr: 1, 1, 0.
//   relu_output (backward_relu; nullptr: none): dy is read as zero where relu_output <= 0.
// backward_reduce (reduce_only == true): sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat).
struct GradParams {
  DType dtype;
  Geometry layout;
  bool reduce_only;
  bool through_stats;
  const void* dy;
  const void* relu_output;
  const void* x;
  const void* weight;
  const void* mean;
  const void* invstd;
  const void* r;
  const void* d;
  void* dx;
  void* grad_weight;
  void* grad_bias;
  void* sum_dy;
  void* sum_dy_xhat;
  cudaStream_t stream;
};

// One elementwise launch, per-channel coefficients read from the p[] tensors:
//   kEval:          out = (x - p0) * p2 * rsqrt(p1 + eps) + p3   (p0 running_mean, p1
//                   running_var, p2 weight or null = 1, p3 bias or null = 0)
//   kNormalize:     out = x * p0 + p1                              (scale, shift)
//   kBackwardInput: out = p2 * (dy - p3 - (x - p0) * p1 * p4)      (mean, invstd, scale,
//                   mean_dy, mean_dy_xhat)
//   kScaleGrad:     out = dy * p0 * p1 * p2                        (weight|null, r|null, invstd)
enum class ElementwiseMode : int { kEval = 0, kNormalize = 1, kBackwardInput = 2, kScaleGrad = 3 };

struct ElementwiseParams {
  DType dtype;
  Geometry layout;
  ElementwiseMode mode;
  const void* x;   // unused by kScaleGrad
  const void* dy;  // kBackwardInput, kScaleGrad
  const void* relu_output;  // nullable: dy read as zero where relu_output <= 0 (backward_relu)
  void* out;
  const void* p[5];
  double eps;
  cudaStream_t stream;
};

enum class Regime : int { kResident = 0, kPersistent = 1, kStreaming = 2 };

// How one reduction call is cut up (batchrenorm_plan.cu). "Items" are what one thread loads at
// a time: a vector of `vec` values along S (NCHW) or along C (NHWC). The reduced axis of a
// channel (group) has `length` items: N*S/vec (NCHW) or N*S rows (NHWC); it is cut into `splits`
// slices of `per` items. NCHW: a team of team_warps warps owns one (channel, slice); NHWC: a
// CTA owns (tile of tx vector columns, slice), its threads laid out tx x ty.
struct LaunchPlan {
  Regime regime;
  int vec;         // values per item: 16 bytes' worth, or 1 (the scalar path)
  int grid;        // CTAs
  int team_warps;  // NCHW on-chip: warps per channel team (1, 2, 4 or 8); else 8
  int tx;          // NHWC: threads across vector columns (1 for NCHW)
  int ty;          // threads along the reduced axis per team
  int items;       // on-chip: items per thread (registers first, then shared memory)
  int register_items;  // on-chip: of which in registers (the kernel's own constant; for the
                       // cost model, benchmarks/gpu_model.py)
  int64_t length;  // items along the reduced axis
  int64_t splits;
  int64_t per;
  int64_t units;   // channel groups x splits
  size_t shared_bytes;     // dynamic shared memory per CTA
  size_t workspace_bytes;  // what launch_* needs
};

cudaError_t plan_stats(const StatsParams& params, LaunchPlan* plan);
cudaError_t launch_stats(const StatsParams& params, const LaunchPlan& plan, void* workspace);
cudaError_t plan_grad(const GradParams& params, LaunchPlan* plan);
cudaError_t launch_grad(const GradParams& params, const LaunchPlan& plan, void* workspace);
cudaError_t elementwise(const ElementwiseParams& params);

}  // namespace cuda
}  // namespace batchrenorm
