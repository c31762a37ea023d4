// batchrenorm_cuda.h: the torch-free interface between the CUDA glue (batchrenorm_cuda.cpp) and
// the kernels (batchrenorm_kernels.cu).
//
// The glue fills one of the argument structs below with raw pointers and sizes and calls the
// launcher; the launcher picks the vector width, plans the grid, launches exactly one kernel on
// `stream` and returns its cudaError_t. Nothing here includes a torch header, so the kernels
// compile with a plain `nvcc -c` (.ci/check_cuda_kernels).
//
// Tensors are seen as (N, C, S), S the product of the trailing dims, in one of two dense
// layouts (strides in elements follow from the sizes):
//   channels_last == false: element (n, c, s) at (n * C + c) * S + s    (NCHW, contiguous)
//   channels_last == true:  element (n, c, s) at (n * S + s) * C + c    (NHWC, channels_last)
// Per-channel tensors (weight, bias, buffers, statistics) are float, or double for double
// input ("stat type"), contiguous, of length C.
//
// Workspace: the single-launch reductions (forward_train, batch_stats, backward,
// backward_reduce) merge per-CTA partials across the grid, so they need a scratch buffer.
// Call the launcher once with workspace == nullptr to get its size in *workspace_bytes (nothing
// is launched), allocate it (the glue uses the caching allocator, so this is free and CUDA-graph
// capturable), then call again with it. Every byte the kernel reads from it was written earlier
// in the same launch, so it needs no initialisation. The grid-wide barrier is the cooperative
// launch's (cudaLaunchCooperativeKernel, grid sized by occupancy so all CTAs are resident):
// it keeps no state of ours between calls, needs no memset and no host synchronisation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "batchrenorm.h"

namespace batchrenorm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Layout {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;
};

// forward_train: y, and save_mean / save_invstd / save_r / save_d (length C), from x; updates
// running_mean / running_var (both or neither: nullptr = no running statistics, r = 1, d = 0)
// and increments *num_batches_tracked (when given and there are running statistics), reading
// the step for the clip bounds on the device.
struct ForwardTrainArgs {
  DType dtype;
  Layout layout;
  const void* x;
  void* y;
  const void* weight;           // nullable
  const void* bias;             // nullable
  void* running_mean;           // nullable
  void* running_var;            // nullable
  int64_t* num_batches_tracked; // nullable
  bool cumulative;              // momentum None: factor 1 / (step + 1)
  double momentum;
  double eps;
  RenormSchedule schedule;
  void* save_mean;
  void* save_invstd;
  void* save_r;
  void* save_d;
  cudaStream_t stream;
};

// batch_stats: per-channel mean and m2 = sum((x - mean)^2).
struct BatchStatsArgs {
  DType dtype;
  Layout layout;
  const void* x;
  void* mean;
  void* m2;
  cudaStream_t stream;
};

// backward: dx = w*r*invstd * (dy - [mean(dy) + xhat * mean(dy * xhat)]), the bracket only when
// batch_stats; grad_weight = r * sum(dy * xhat) + d * sum(dy); grad_bias = sum(dy).
// dx / grad_weight / grad_bias nullptr: not computed. weight, r, d nullptr: 1, 1, 0.
struct BackwardArgs {
  DType dtype;
  Layout layout;
  const void* dy;
  const void* x;
  const void* weight;
  const void* mean;
  const void* invstd;
  const void* r;
  const void* d;
  bool batch_stats;
  void* dx;
  void* grad_weight;
  void* grad_bias;
  cudaStream_t stream;
};

// backward_reduce: sum(dy) and sum(dy * (x - mean) * invstd) per channel.
struct BackwardReduceArgs {
  DType dtype;
  Layout layout;
  const void* dy;
  const void* x;
  const void* mean;
  const void* invstd;
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

struct ElementwiseArgs {
  DType dtype;
  Layout layout;
  ElementwiseMode mode;
  const void* x;   // unused by kScaleGrad
  const void* dy;  // kBackwardInput, kScaleGrad
  void* out;
  const void* p[5];
  double eps;
  cudaStream_t stream;
};

cudaError_t forward_train(const ForwardTrainArgs& args, void* workspace, size_t* workspace_bytes);
cudaError_t batch_stats(const BatchStatsArgs& args, void* workspace, size_t* workspace_bytes);
cudaError_t backward(const BackwardArgs& args, void* workspace, size_t* workspace_bytes);
cudaError_t backward_reduce(const BackwardReduceArgs& args, void* workspace,
                            size_t* workspace_bytes);
cudaError_t elementwise(const ElementwiseArgs& args);

}  // namespace cuda
}  // namespace batchrenorm
