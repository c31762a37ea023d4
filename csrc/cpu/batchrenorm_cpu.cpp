// batchrenorm_cpu.cpp: the CPU kernels of the `batchrenorm` ops (TORCH_LIBRARY_IMPL(CPU)).
//
// Layouts. Every input is seen as one of two canonical layouts, read in place:
//  - planes: (N, C, S) contiguous, S = prod(spatial) > 1; channel c is N runs of S values.
//  - rows:   (M, C) with the channels innermost: channels_last / channels_last_3d inputs
//            (M = N * spatial) and contiguous inputs without spatial extent (S == 1).
// Other strides are made contiguous first. Outputs keep the input's memory format, as
// batchrenorm_cuda._ops.memory_format_of says.
//
// Numerics. Statistics are gathered chunk by chunk: a chunk (a few KiB, so it stays in L1) is
// summed once for a provisional mean, then summed again centred on it, and the chunk's exact
// (mean, M2) are merged into float64 accumulators with Chan's formula. So x is read from memory
// once for the statistics and once for the output (two passes), and a channel with mean 1e4
// and std 1e-2 keeps its precision: float32 only ever sums centred values. The elementwise
// passes are centred as well, y = (x - mean) * scale + shift, because x * scale + shift
// cancels catastrophically when |mean| >> std.
//
// Determinism. Reductions split into work items of a fixed size (independent of the thread
// count and of timing), each with its own partial result; the partials are merged per channel
// in item order. Same inputs => bit-identical outputs, whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batchrenorm.h"

namespace batchrenorm {
namespace cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Element types: acc_t is float for float / half / bfloat16 input, double for double.

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One accumulation vector's worth (aVec::size() values) of scalar_t, as acc_t.
template <typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return Vectorized<scalar_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

template <typename scalar_t>
inline void store_acc(scalar_t* p, const Vectorized<acc_type<scalar_t>>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vectorized<float>::size());
  }
}

// ---------------------------------------------------------------------------------------------
// Canonical layout of an input.

struct Geometry {
  int64_t N = 0, C = 0, S = 1;  // (N, C, S); S = prod(spatial)
  bool rows = false;            // channels innermost: element (m, c) at m * C + c, m < N * S
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t count() const { return N * S; }  // values per channel
};

at::MemoryFormat memory_format_of(const Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// `x` in a layout the kernels read in place (a copy only for other strides).
Tensor canonical(const Tensor& x, Geometry* g) {
  g->format = memory_format_of(x);
  g->N = x.size(0);
  g->C = x.size(1);
  g->S = 1;
  for (int64_t i = 2; i < x.dim(); ++i) g->S *= x.size(i);
  g->rows = g->format != at::MemoryFormat::Contiguous || g->S == 1;
  return x.contiguous(g->format);
}

// grad_output in the same layout as the (canonical) input, whatever layout it arrived in.
Tensor match_layout(const Tensor& dy, const Geometry& g) { return dy.contiguous(g.format); }

// ---------------------------------------------------------------------------------------------
// Argument checks for direct callers of the ops (batchrenorm_cuda.batch_renorm checks first).

void check_input(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": input must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": input must have shape (N, C, *) of rank >= 2, got shape ",
              x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": input must be float32, float64, float16 or bfloat16, got ", t);
}

at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_per_channel(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (C,) = (", C,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == stat_type(x), op, ": ", name, " must be ", stat_type(x),
              " for ", x.scalar_type(), " input, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_per_channel(const char* op, const char* name, const std::optional<Tensor>& t,
                       const Tensor& x) {
  if (t.has_value() && t->defined()) check_per_channel(op, name, *t, x);
}

void check_grad_output(const char* op, const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": grad_output must have the input's shape ",
              x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": grad_output must be ",
              x.scalar_type(), " like input, got ", dy.scalar_type());
  TORCH_CHECK(dy.device().is_cpu(), op, ": grad_output must be a CPU tensor, got ",
              dy.device());
}

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A per-channel tensor as a contiguous vector of doubles (`fill` when absent).
template <typename acc_t>
std::vector<double> channel_values(const std::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (!present(t)) return out;
  const Tensor c = t->contiguous();
  const acc_t* p = c.data_ptr<acc_t>();
  for (int64_t i = 0; i < C; ++i) out[i] = static_cast<double>(p[i]);
  return out;
}

template <typename acc_t>
Tensor to_tensor(const std::vector<double>& v, const Tensor& like) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())},
                       like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p = t.data_ptr<acc_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<acc_t>(v[i]);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Work partition of the reductions: fixed sizes only, so the result does not depend on the
// thread count. A chunk is what is read twice from cache; a block is one work item.

constexpr int64_t kPlaneChunk = 2048;           // values of one channel (planes)
constexpr int64_t kPlaneBlock = 16 * kPlaneChunk;
constexpr int64_t kRowChunk = 64;               // rows per chunk (rows)
constexpr int64_t kRowBlock = 16 * kRowChunk;   // rows per work item
constexpr int64_t kChannelBlock = 64;           // channels per work item (rows)

// Visits the runs of channel c covering its logical values [k0, k1) (planes layout).
template <typename F>
inline void for_each_run(const Geometry& g, int64_t c, int64_t k0, int64_t k1, const F& f) {
  int64_t n = k0 / g.S, s = k0 % g.S;
  while (k0 < k1) {
    const int64_t len = std::min(g.S - s, k1 - k0);
    f((n * g.C + c) * g.S + s, len);
    k0 += len;
    ++n;
    s = 0;
  }
}

struct Moments {  // count, mean, M2 = sum((x - mean)^2)
  double n = 0, mean = 0, m2 = 0;
  // Chan et al.'s parallel merge.
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
  void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

// A chunk's (mean, M2) from its provisional mean mc and the centred sums s1 = sum(x - mc),
// s2 = sum((x - mc)^2): exact up to the rounding of the centred values.
inline void merge_chunk(Moments& m, double len, double mc, double s1, double s2) {
  const double shift = s1 / len;
  m.merge(len, mc + shift, std::max(s2 - s1 * shift, 0.0));
}

// Per-channel mean and M2 of x (canonical layout) in float64.
template <typename scalar_t>
std::vector<Moments> channel_moments(const Tensor& x, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const scalar_t* px = x.data_ptr<scalar_t>();
  const int64_t C = g.C, count = g.count();
  std::vector<Moments> result(C);
  if (count == 0) return result;

  if (!g.rows) {
    const int64_t nblocks = (count + kPlaneBlock - 1) / kPlaneBlock;
    std::vector<Moments> partial(C * nblocks);
    at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / nblocks, b = item % nblocks;
        const int64_t kb1 = std::min(count, (b + 1) * kPlaneBlock);
        Moments m;
        for (int64_t k0 = b * kPlaneBlock; k0 < kb1; k0 += kPlaneChunk) {
          const int64_t k1 = std::min(kb1, k0 + kPlaneChunk);
          // Pass 1 over the chunk: its provisional mean.
          aVec vsum(acc_t(0));
          acc_t ssum = 0;
          for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
            const scalar_t* p = px + off;
            int64_t i = 0;
            for (; i + V <= len; i += V) vsum += load_acc(p + i);
            for (; i < len; ++i) ssum += static_cast<acc_t>(p[i]);
          });
          const acc_t len = static_cast<acc_t>(k1 - k0);
          const acc_t mc = (at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), vsum) + ssum) / len;
          // Pass 2, from cache: sums centred on it.
          const aVec vmc(mc);
          aVec v1(acc_t(0)), v2(acc_t(0));
          acc_t s1 = 0, s2 = 0;
          for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
            const scalar_t* p = px + off;
            int64_t i = 0;
            for (; i + V <= len; i += V) {
              const aVec dv = load_acc(p + i) - vmc;
              v1 += dv;
              v2 = at::vec::fmadd(dv, dv, v2);
            }
            for (; i < len; ++i) {
              const acc_t dv = static_cast<acc_t>(p[i]) - mc;
              s1 += dv;
              s2 += dv * dv;
            }
          });
          s1 += at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), v1);
          s2 += at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), v2);
          merge_chunk(m, static_cast<double>(k1 - k0), mc, s1, s2);
        }
        partial[item] = m;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < nblocks; ++b) result[c].merge(partial[c * nblocks + b]);
    return result;
  }

  // rows: work items are (channel block, row block); lanes run over channels.
  const int64_t M = count;
  const int64_t ncb = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock;
  std::vector<Moments> partial(nrb * C);
  at::parallel_for(0, ncb * nrb, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t NV = kChannelBlock / V + 1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t cb = item / nrb, rb = item % nrb;
      const int64_t c0 = cb * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      const int64_t r_end = std::min(M, (rb + 1) * kRowBlock);
      Moments* out = partial.data() + rb * C;
      const int64_t nvec = (c1 - c0) / V;  // full vectors; the rest of the channels is scalar
      for (int64_t r0 = rb * kRowBlock; r0 < r_end; r0 += kRowChunk) {
        const int64_t r1 = std::min(r_end, r0 + kRowChunk);
        const acc_t len = static_cast<acc_t>(r1 - r0);
        aVec mc[NV], s1[NV], s2[NV];
        for (int64_t j = 0; j < nvec; ++j) mc[j] = aVec(acc_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* p = px + r * C + c0;
          for (int64_t j = 0; j < nvec; ++j) {
            mc[j] += load_acc(p + j * V);
          }
        }
        for (int64_t j = 0; j < nvec; ++j) {
          mc[j] = mc[j] / aVec(len);
          s1[j] = aVec(acc_t(0));
          s2[j] = aVec(acc_t(0));
        }
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* p = px + r * C + c0;
          for (int64_t j = 0; j < nvec; ++j) {
            const aVec dv = load_acc(p + j * V) - mc[j];
            s1[j] += dv;
            s2[j] = at::vec::fmadd(dv, dv, s2[j]);
          }
        }
        for (int64_t j = 0; j < nvec; ++j) {
          acc_t amc[V], as1[V], as2[V];
          mc[j].store(amc);
          s1[j].store(as1);
          s2[j].store(as2);
          for (int64_t l = 0; l < V; ++l)
            merge_chunk(out[c0 + j * V + l], static_cast<double>(len), amc[l], as1[l], as2[l]);
        }
        for (int64_t c = c0 + nvec * V; c < c1; ++c) {
          acc_t sum = 0;
          for (int64_t r = r0; r < r1; ++r) sum += static_cast<acc_t>(px[r * C + c]);
          const acc_t m0 = sum / len;
          acc_t a1 = 0, a2 = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t dv = static_cast<acc_t>(px[r * C + c]) - m0;
            a1 += dv;
            a2 += dv * dv;
          }
          merge_chunk(out[c], static_cast<double>(len), m0, a1, a2);
        }
      }
    }
  });
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t c = 0; c < C; ++c) result[c].merge(partial[rb * C + c]);
  return result;
}

// Per channel: sum(dy), sum(dy * (x - m)) and, when kCentre, sum(x - m), in float64.
struct GradSums {
  double dy = 0, dy_xc = 0, xc = 0;
  void add(const GradSums& o) {
    dy += o.dy;
    dy_xc += o.dy_xc;
    xc += o.xc;
  }
};

template <typename scalar_t, bool kCentre>
std::vector<GradSums> channel_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g,
                                        const std::vector<double>& mean) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const scalar_t* px = x.data_ptr<scalar_t>();
  const scalar_t* pg = dy.data_ptr<scalar_t>();
  const int64_t C = g.C, count = g.count();
  std::vector<acc_t> m(C);
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(mean[c]);
  std::vector<GradSums> result(C);
  if (count == 0) return result;

  if (!g.rows) {
    const int64_t nblocks = (count + kPlaneBlock - 1) / kPlaneBlock;
    std::vector<GradSums> partial(C * nblocks);
    at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / nblocks, b = item % nblocks;
        const int64_t kb1 = std::min(count, (b + 1) * kPlaneBlock);
        const acc_t mc = m[c];
        const aVec vm(mc);
        GradSums sums;
        // float accumulators per chunk, flushed into float64 per chunk.
        for (int64_t k0 = b * kPlaneBlock; k0 < kb1; k0 += kPlaneChunk) {
          const int64_t k1 = std::min(kb1, k0 + kPlaneChunk);
          aVec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0));
          acc_t s0 = 0, s1 = 0, s2 = 0;
          for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
            const scalar_t* p = px + off;
            const scalar_t* q = pg + off;
            int64_t i = 0;
            for (; i + V <= len; i += V) {
              const aVec gv = load_acc(q + i);
              const aVec xc = load_acc(p + i) - vm;
              a0 += gv;
              a1 = at::vec::fmadd(gv, xc, a1);
              if constexpr (kCentre) a2 += xc;
            }
            for (; i < len; ++i) {
              const acc_t gv = static_cast<acc_t>(q[i]);
              const acc_t xc = static_cast<acc_t>(p[i]) - mc;
              s0 += gv;
              s1 += gv * xc;
              if constexpr (kCentre) s2 += xc;
            }
          });
          sums.dy += static_cast<double>(s0 + at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), a0));
          sums.dy_xc += static_cast<double>(s1 + at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), a1));
          if constexpr (kCentre)
            sums.xc += static_cast<double>(s2 + at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), a2));
        }
        partial[item] = sums;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < nblocks; ++b) result[c].add(partial[c * nblocks + b]);
    return result;
  }

  const int64_t M = count;
  const int64_t ncb = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock;
  std::vector<GradSums> partial(nrb * C);
  at::parallel_for(0, ncb * nrb, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t NV = kChannelBlock / V + 1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t cb = item / nrb, rb = item % nrb;
      const int64_t c0 = cb * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      const int64_t r_end = std::min(M, (rb + 1) * kRowBlock);
      GradSums* out = partial.data() + rb * C;
      const int64_t nvec = (c1 - c0) / V;
      aVec vm[NV];
      for (int64_t j = 0; j < nvec; ++j) vm[j] = aVec::loadu(m.data() + c0 + j * V);
      for (int64_t r0 = rb * kRowBlock; r0 < r_end; r0 += kRowChunk) {
        const int64_t r1 = std::min(r_end, r0 + kRowChunk);
        aVec a0[NV], a1[NV], a2[NV];
        for (int64_t j = 0; j < nvec; ++j) {
          a0[j] = aVec(acc_t(0));
          a1[j] = aVec(acc_t(0));
          a2[j] = aVec(acc_t(0));
        }
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* p = px + r * C + c0;
          const scalar_t* q = pg + r * C + c0;
          for (int64_t j = 0; j < nvec; ++j) {
            const aVec gv = load_acc(q + j * V);
            const aVec xc = load_acc(p + j * V) - vm[j];
            a0[j] += gv;
            a1[j] = at::vec::fmadd(gv, xc, a1[j]);
            if constexpr (kCentre) a2[j] += xc;
          }
        }
        for (int64_t j = 0; j < nvec; ++j) {
          acc_t b0[V], b1[V], b2[V];
          a0[j].store(b0);
          a1[j].store(b1);
          a2[j].store(b2);
          for (int64_t l = 0; l < V; ++l) {
            GradSums& o = out[c0 + j * V + l];
            o.dy += b0[l];
            o.dy_xc += b1[l];
            if constexpr (kCentre) o.xc += b2[l];
          }
        }
        for (int64_t c = c0 + nvec * V; c < c1; ++c) {
          acc_t s0 = 0, s1 = 0, s2 = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t gv = static_cast<acc_t>(pg[r * C + c]);
            const acc_t xc = static_cast<acc_t>(px[r * C + c]) - m[c];
            s0 += gv;
            s1 += gv * xc;
            if constexpr (kCentre) s2 += xc;
          }
          out[c].dy += s0;
          out[c].dy_xc += s1;
          if constexpr (kCentre) out[c].xc += s2;
        }
      }
    }
  });
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t c = 0; c < C; ++c) result[c].add(partial[rb * C + c]);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes, one read of each input and one write, per channel coefficients:
//   kAffine: out = (x - m) * a + b
//   kGrad:   out = dy * a + (x - m) * b + k
//   kScale:  out = dy * a
enum class Form { kAffine, kGrad, kScale };

template <typename acc_t>
struct Coeffs {  // per channel, in acc_t
  std::vector<acc_t> m, a, b, k;
  explicit Coeffs(int64_t C) : m(C, 0), a(C, 0), b(C, 0), k(C, 0) {}
};

constexpr int64_t kElementGrain = 16384;

template <typename scalar_t, Form kForm>
void elementwise(Tensor& out, const Tensor& x, const Tensor& dy, const Geometry& g,
                 const Coeffs<acc_type<scalar_t>>& co) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const int64_t C = g.C, numel = g.N * g.C * g.S;
  if (numel == 0) return;
  const scalar_t* px = kForm == Form::kScale ? nullptr : x.data_ptr<scalar_t>();
  const scalar_t* pg = kForm == Form::kAffine ? nullptr : dy.data_ptr<scalar_t>();
  scalar_t* po = out.data_ptr<scalar_t>();

  // One value: the scalar tails.
  auto one = [&](int64_t i, int64_t c) {
    acc_t v;
    if constexpr (kForm == Form::kAffine) {
      v = (static_cast<acc_t>(px[i]) - co.m[c]) * co.a[c] + co.b[c];
    } else if constexpr (kForm == Form::kGrad) {
      v = static_cast<acc_t>(pg[i]) * co.a[c] + (static_cast<acc_t>(px[i]) - co.m[c]) * co.b[c] +
          co.k[c];
    } else {
      v = static_cast<acc_t>(pg[i]) * co.a[c];
    }
    po[i] = static_cast<scalar_t>(v);
  };
  auto vec = [&](int64_t i, const aVec& m, const aVec& a, const aVec& b, const aVec& k) {
    aVec v;
    if constexpr (kForm == Form::kAffine) {
      v = at::vec::fmadd(load_acc(px + i) - m, a, b);
    } else if constexpr (kForm == Form::kGrad) {
      v = at::vec::fmadd(load_acc(pg + i), a, at::vec::fmadd(load_acc(px + i) - m, b, k));
    } else {
      v = load_acc(pg + i) * a;
    }
    store_acc(po + i, v);
  };

  if (!g.rows) {
    const int64_t S = g.S;
    at::parallel_for(0, numel, kElementGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t run = i / S;
        const int64_t c = run % C;
        const int64_t stop = std::min(end, (run + 1) * S);
        const aVec m(co.m[c]), a(co.a[c]), b(co.b[c]), k(co.k[c]);
        for (; i + V <= stop; i += V) vec(i, m, a, b, k);
        for (; i < stop; ++i) one(i, c);
      }
    });
    return;
  }
  const int64_t M = g.count();
  const int64_t nvec = C / V;
  at::parallel_for(0, M, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * C;
      for (int64_t j = 0; j < nvec; ++j) {
        const int64_t c = j * V;
        vec(base + c, aVec::loadu(co.m.data() + c), aVec::loadu(co.a.data() + c),
            aVec::loadu(co.b.data() + c), aVec::loadu(co.k.data() + c));
      }
      for (int64_t c = nvec * V; c < C; ++c) one(base + c, c);
    }
  });
}

Tensor empty_output(const Tensor& x, const Geometry& g) {
  return at::empty(x.sizes(), x.options().memory_format(g.format));
}

// ---------------------------------------------------------------------------------------------
// The ops.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_train(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum,
    double eps, double r_max, double d_max, int64_t warmup_steps, int64_t r_max_ramp_steps,
    int64_t d_max_ramp_steps) {
  constexpr const char* op = "batchrenorm::forward_train";
  check_input(op, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  const bool has_running = present(running_mean);
  TORCH_CHECK(has_running == present(running_var), op,
              ": running_mean and running_var must both be tensors or both be None");
  const bool has_step = present(num_batches_tracked);
  if (has_step) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->numel() == 1 && num_batches_tracked->device().is_cpu(),
                op, ": num_batches_tracked must be an int64 CPU scalar tensor, got ",
                num_batches_tracked->scalar_type(), " of shape ", num_batches_tracked->sizes(),
                " on ", num_batches_tracked->device());
  }
  TORCH_CHECK(momentum.has_value() || has_step || !has_running, op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(r_max >= 1.0, op, ": r_max must be >= 1, got ", r_max);
  TORCH_CHECK(d_max >= 0.0, op, ": d_max must be >= 0, got ", d_max);

  Geometry g;
  const Tensor x = canonical(input, &g);
  const int64_t count = g.count();
  TORCH_CHECK(count > 1, op, ": expected more than 1 value per channel when training, got input size ",
              input.sizes());
  const int64_t C = g.C;
  Tensor output = empty_output(input, g);
  Tensor save_mean, save_invstd, save_r, save_d;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_train_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(bias, C, 0.0);

    const int64_t step = has_step ? num_batches_tracked->item<int64_t>() : 0;
    const RenormSchedule schedule{r_max, d_max, warmup_steps, r_max_ramp_steps, d_max_ramp_steps};
    double rmax_d = 1.0, dmax_d = 0.0;
    clip_bounds(schedule, has_step, step, &rmax_d, &dmax_d);
    // The bounds are rounded to acc_t before clipping, as the reference does.
    const acc_t rmax = static_cast<acc_t>(rmax_d), dmax = static_cast<acc_t>(dmax_d);
    const acc_t factor = static_cast<acc_t>(
        running_average_factor(!momentum.has_value(), momentum.value_or(0.0), step));

    Tensor rm, rv;
    acc_t* prm = nullptr;
    acc_t* prv = nullptr;
    if (has_running) {
      rm = running_mean->contiguous();
      rv = running_var->contiguous();
      prm = rm.data_ptr<acc_t>();
      prv = rv.data_ptr<acc_t>();
    }
    Coeffs<acc_t> co(C);
    std::vector<double> vmean(C), vinvstd(C), vr(C), vd(C);
    for (int64_t c = 0; c < C; ++c) {
      const double mean = mom[c].mean;
      const double var = mom[c].m2 / static_cast<double>(count);
      const acc_t mean_a = static_cast<acc_t>(mean), var_a = static_cast<acc_t>(var);
      const ChannelCoeffs<acc_t> k = renorm_coeffs<acc_t>(
          mean_a, var_a, static_cast<acc_t>(eps), has_running, has_running ? prm[c] : acc_t(0),
          has_running ? prv[c] : acc_t(1), rmax, dmax, static_cast<acc_t>(w[c]),
          static_cast<acc_t>(b[c]));
      // y = x * scale + shift, evaluated centred on mean_a (see the header comment): the shift
      // that goes with (x - mean_a) is shift + scale * mean_a
      //   = bias + weight * (d - r * invstd * (mean - mean_a)),
      // where mean - mean_a is the float64 mean's rounding residue.
      co.m[c] = mean_a;
      co.a[c] = k.scale;
      co.b[c] = static_cast<acc_t>(
          b[c] + w[c] * (static_cast<double>(k.d) -
                         static_cast<double>(k.r) * static_cast<double>(k.invstd) *
                             (mean - static_cast<double>(mean_a))));
      vmean[c] = mean_a;
      vinvstd[c] = k.invstd;
      vr[c] = k.r;
      vd[c] = k.d;
      if (has_running) update_running<acc_t>(mean_a, var_a, count, factor, prm + c, prv + c);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
    if (has_running) {
      if (!running_mean->is_same(rm)) running_mean->copy_(rm);
      if (!running_var->is_same(rv)) running_var->copy_(rv);
    }
    save_mean = to_tensor<acc_t>(vmean, input);
    save_invstd = to_tensor<acc_t>(vinvstd, input);
    save_r = to_tensor<acc_t>(vr, input);
    save_d = to_tensor<acc_t>(vd, input);
  });
  if (has_step) num_batches_tracked->add_(1);
  return {output, save_mean, save_invstd, save_r, save_d};
}

Tensor forward_eval(const Tensor& input, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const Tensor& running_mean,
                    const Tensor& running_var, double eps) {
  constexpr const char* op = "batchrenorm::forward_eval";
  check_input(op, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  Geometry g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_forward_eval_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(bias, C, 0.0);
    const std::vector<double> rm = channel_values<acc_t>(running_mean, C, 0.0);
    const std::vector<double> rv = channel_values<acc_t>(running_var, C, 1.0);
    Coeffs<acc_t> co(C);
    for (int64_t c = 0; c < C; ++c) {
      // As the reference: invstd in acc_t, then (x - mean) * invstd * weight + bias.
      const acc_t invstd = acc_t(1) / std::sqrt(static_cast<acc_t>(rv[c]) + static_cast<acc_t>(eps));
      co.m[c] = static_cast<acc_t>(rm[c]);
      co.a[c] = invstd * static_cast<acc_t>(w[c]);
      co.b[c] = static_cast<acc_t>(b[c]);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
  });
  return output;
}

using OptTensor = std::optional<Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor> backward(const Tensor& grad_output, const Tensor& input,
                                            const std::optional<Tensor>& weight,
                                            const Tensor& mean, const Tensor& invstd,
                                            const std::optional<Tensor>& r,
                                            const std::optional<Tensor>& d, bool batch_stats,
                                            std::array<bool, 3> output_mask) {
  constexpr const char* op = "batchrenorm::backward";
  check_input(op, input);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "r", r, input);
  check_per_channel(op, "d", d, input);
  Geometry g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  const int64_t C = g.C;
  const double count = static_cast<double>(g.count());
  const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && batch_stats);
  Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = empty_output(input, g);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> w = channel_values<acc_t>(weight, C, 1.0);
    const std::vector<double> vm = channel_values<acc_t>(mean, C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, C, 1.0);
    const std::vector<double> vr = channel_values<acc_t>(r, C, 1.0);
    const std::vector<double> vd = channel_values<acc_t>(d, C, 0.0);
    std::vector<GradSums> sums;
    if (need_sums) {
      // With the batch's own statistics, sum(x - mean) recovers the float64 mean's residue
      // that the saved (rounded) mean lost: mean_true = mean + sum(x - mean) / count.
      sums = batch_stats ? channel_grad_sums<scalar_t, true>(dy, x, g, vm)
                         : channel_grad_sums<scalar_t, false>(dy, x, g, vm);
    }
    std::vector<double> sum_dy_xhat(C, 0.0), residue(C, 0.0);
    if (need_sums) {
      for (int64_t c = 0; c < C; ++c) {
        residue[c] = batch_stats && count > 0 ? sums[c].xc / count : 0.0;
        sum_dy_xhat[c] = vi[c] * (sums[c].dy_xc - residue[c] * sums[c].dy);
      }
    }
    if (output_mask[1]) {
      std::vector<double> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = vr[c] * sum_dy_xhat[c] + vd[c] * sums[c].dy;
      grad_weight = to_tensor<acc_t>(gw, mean);
    }
    if (output_mask[2]) {
      std::vector<double> gb(C);
      for (int64_t c = 0; c < C; ++c) gb[c] = sums[c].dy;
      grad_bias = to_tensor<acc_t>(gb, mean);
    }
    if (output_mask[0]) {
      Coeffs<acc_t> co(C);
      for (int64_t c = 0; c < C; ++c) {
        const double k = w[c] * vr[c] * vi[c];
        co.a[c] = static_cast<acc_t>(k);
        if (batch_stats && count > 0) {
          // dx = k * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean - residue) * invstd
          const double mean_dy = sums[c].dy / count;
          const double mean_dy_xhat = sum_dy_xhat[c] / count;
          co.m[c] = static_cast<acc_t>(vm[c]);
          co.b[c] = static_cast<acc_t>(-k * vi[c] * mean_dy_xhat);
          co.k[c] = static_cast<acc_t>(-k * mean_dy + k * vi[c] * mean_dy_xhat * residue[c]);
        }
      }
      if (batch_stats)
        elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, g, co);
      else
        elementwise<scalar_t, Form::kScale>(grad_input, x, dy, g, co);
    }
  });
  auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  return {opt(grad_input), opt(grad_weight), opt(grad_bias)};
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& input) {
  constexpr const char* op = "batchrenorm::batch_stats";
  check_input(op, input);
  Geometry g;
  const Tensor x = canonical(input, &g);
  TORCH_CHECK(g.count() > 0, op, ": expected at least 1 value per channel, got input size ",
              input.sizes());
  Tensor mean, m2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_batch_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<Moments> mom = channel_moments<scalar_t>(x, g);
    std::vector<double> vm(g.C), v2(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      vm[c] = mom[c].mean;
      v2[c] = mom[c].m2;
    }
    mean = to_tensor<acc_t>(vm, input);
    m2 = to_tensor<acc_t>(v2, input);
  });
  return {mean, m2};
}

Tensor normalize(const Tensor& input, const Tensor& scale, const Tensor& shift) {
  constexpr const char* op = "batchrenorm::normalize";
  check_input(op, input);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "shift", shift, input);
  Geometry g;
  const Tensor x = canonical(input, &g);
  Tensor output = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_normalize_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> a = channel_values<acc_t>(scale, g.C, 1.0);
    const std::vector<double> b = channel_values<acc_t>(shift, g.C, 0.0);
    Coeffs<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      co.a[c] = static_cast<acc_t>(a[c]);
      co.b[c] = static_cast<acc_t>(b[c]);
    }
    elementwise<scalar_t, Form::kAffine>(output, x, Tensor(), g, co);
  });
  return output;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input,
                                           const Tensor& mean, const Tensor& invstd) {
  constexpr const char* op = "batchrenorm::backward_reduce";
  check_input(op, input);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  Geometry g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor sum_dy, sum_dy_xhat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_reduce_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> vm = channel_values<acc_t>(mean, g.C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, g.C, 1.0);
    const std::vector<GradSums> sums = channel_grad_sums<scalar_t, false>(dy, x, g, vm);
    std::vector<double> s0(g.C), s1(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      s0[c] = sums[c].dy;
      s1[c] = vi[c] * sums[c].dy_xc;
    }
    sum_dy = to_tensor<acc_t>(s0, mean);
    sum_dy_xhat = to_tensor<acc_t>(s1, mean);
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_input(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                      const Tensor& invstd, const Tensor& scale, const Tensor& mean_dy,
                      const Tensor& mean_dy_xhat) {
  constexpr const char* op = "batchrenorm::backward_input";
  check_input(op, input);
  check_grad_output(op, grad_output, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "scale", scale, input);
  check_per_channel(op, "mean_dy", mean_dy, input);
  check_per_channel(op, "mean_dy_xhat", mean_dy_xhat, input);
  Geometry g;
  const Tensor x = canonical(input, &g);
  const Tensor dy = match_layout(grad_output, g);
  Tensor grad_input = empty_output(input, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batchrenorm_backward_input_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<double> vm = channel_values<acc_t>(mean, g.C, 0.0);
    const std::vector<double> vi = channel_values<acc_t>(invstd, g.C, 1.0);
    const std::vector<double> vs = channel_values<acc_t>(scale, g.C, 1.0);
    const std::vector<double> md = channel_values<acc_t>(mean_dy, g.C, 0.0);
    const std::vector<double> mdx = channel_values<acc_t>(mean_dy_xhat, g.C, 0.0);
    Coeffs<acc_t> co(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      co.m[c] = static_cast<acc_t>(vm[c]);
      co.a[c] = static_cast<acc_t>(vs[c]);
      co.b[c] = static_cast<acc_t>(-vs[c] * vi[c] * mdx[c]);
      co.k[c] = static_cast<acc_t>(-vs[c] * md[c]);
    }
    elementwise<scalar_t, Form::kGrad>(grad_input, x, dy, g, co);
  });
  return grad_input;
}

}  // namespace
}  // namespace cpu
}  // namespace batchrenorm

TORCH_LIBRARY_IMPL(batchrenorm, CPU, m) {
  m.impl("forward_train", &batchrenorm::cpu::forward_train);
  m.impl("forward_eval", &batchrenorm::cpu::forward_eval);
  m.impl("backward", &batchrenorm::cpu::backward);
  m.impl("batch_stats", &batchrenorm::cpu::batch_stats);
  m.impl("normalize", &batchrenorm::cpu::normalize);
  m.impl("backward_reduce", &batchrenorm::cpu::backward_reduce);
  m.impl("backward_input", &batchrenorm::cpu::backward_input);
}
