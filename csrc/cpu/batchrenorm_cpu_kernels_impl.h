// batchrenorm_cpu_kernels_impl.h: the CPU kernel templates, compiled once per instruction set.
//
// Included only by batchrenorm_cpu_kernels_<isa>.cpp, each of which defines BRN_CPU_ISA (the
// namespace) and, for AVX2 and AVX-512, the target and at::vec's CPU_CAPABILITY first:
// at::vec::Vectorized then uses 256- or 512-bit registers there, and the portable file keeps
// the baseline instruction set. Everything here lives in namespace BRN_CPU_ISA so the copies
// never share a symbol.
// See batchrenorm_cpu.cpp for the layouts, the numerics and the determinism argument.
#pragma once

#ifndef BRN_CPU_ISA
#error "define BRN_CPU_ISA before including batchrenorm_cpu_kernels_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <functional>
#include <tuple>
#include <type_traits>

#include "cpu/batchrenorm_cpu_kernels.h"

namespace batchrenorm {
namespace cpu {
namespace BRN_CPU_ISA {

using at::vec::Vectorized;

// Per-work-item partials. A type of this namespace, so that the std::vector code instantiated
// for it is this instruction set's own and is never merged with the other file's.
template <typename T>
struct Slot {
  T v;
};

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

// a * b + c as a lane of at::vec::fmadd computes it here: fused where this instruction set's
// vectors fuse it (AVX2, AVX-512), unfused in the portable build. The scalar tails use it so that
// their bits never depend on whether the compiler chose to contract a * b + c there (it did in
// one template instance and not in another: the masked and unmasked backwards differed in the
// last bit on AVX-512).
template <typename T>
inline T fmadd_one(T a, T b, T c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// dy zeroed where relu_output <= 0 (kMasked, see Form): a compare and a blend, so that a NaN
// in relu_output lets dy through as threshold_backward's where(relu_output <= 0, 0, dy) does.
template <typename aVec>
inline aVec relu_masked(const aVec& dy, const aVec& relu_output) {
  const aVec zero(0);
  return aVec::blendv(dy, zero, relu_output <= zero);
}

// One vector of dy from index i as acc_t, masked by relu_output when kMasked.
template <bool kMasked, typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load_grad(const scalar_t* pg, const scalar_t* pz,
                                                int64_t i) {
  const Vectorized<acc_type<scalar_t>> dy = load_acc(pg + i);
  if constexpr (kMasked) return relu_masked(dy, load_acc(pz + i));
  return dy;
}

// One value of dy, the same way.
template <bool kMasked, typename scalar_t>
inline acc_type<scalar_t> grad_one(const scalar_t* pg, const scalar_t* pz, int64_t i) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (kMasked) {
    if (static_cast<acc_t>(pz[i]) <= acc_t(0)) return acc_t(0);
  }
  return static_cast<acc_t>(pg[i]);
}

// ---------------------------------------------------------------------------------------------
// Work partition of the reductions: fixed sizes only, so the result does not depend on the
// thread count. A chunk is what is read twice from cache; a block is one work item.

constexpr int64_t kPlaneChunk = 2048;           // values of one channel (planes)
constexpr int64_t kPlaneBlock = 16 * kPlaneChunk;
constexpr int64_t kRowChunk = 64;               // rows per chunk (rows)
// rows per work item: 256, so that a few hundred rows (a 7x7 or 14x14 map at small N) still
// give every thread whole rows to read.
constexpr int64_t kRowBlock = 4 * kRowChunk;
constexpr int64_t kChannelBlock = 64;           // smallest channel split of a row block (rows)
// The moments' chunk (rows): a whole work item. Each chunk ends in a float64 Chan merge per
// channel (three divisions), which at 64 rows cost as much as the chunk's loads and arithmetic;
// a group's 256 rows (4 vectors: 32 KiB in float32) are still re-read from L1.
constexpr int64_t kRowMomentsChunk = kRowBlock;

// Channels per work item (rows layout): whole rows when there are enough row blocks to share
// out (one per thread), so each item reads its rows' memory contiguously; narrower blocks
// (multiples of the vector width) otherwise. A channel's result does not depend on this split (lanes are
// independent channels and rows are always summed in the same chunks), only the speed does.
inline int64_t rows_channel_block(int64_t C, int64_t nrb, int64_t V) {
  // One row block per thread is enough: reading parts of rows costs more than an uneven
  // share (the prefetchers bring in the rest of each row, so the tensor is read twice).
  const int64_t kMinItems = static_cast<int64_t>(at::get_num_threads());
  if (nrb >= kMinItems) return std::max<int64_t>(C, 1);
  const int64_t want = (kMinItems + nrb - 1) / nrb;  // channel blocks per row block
  int64_t cb = (C + want - 1) / want;
  cb = std::max(kChannelBlock, (cb + V - 1) / V * V);
  return std::max<int64_t>(std::min(cb, C), 1);
}

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

// Chan et al.'s parallel merge of (nb, mean_b, m2_b) into m.
inline void merge(Moments& m, double nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  // Into an empty m the merge is the copy (the general formula gives the same values through
  // two divisions, which were most of a 7 x 7 map's moments on 2,048 channels).
  if (m.n == 0) {
    m = Moments{nb, mean_b, m2_b};
    return;
  }
  const double total = m.n + nb;
  const double delta = mean_b - m.mean;
  m.mean += delta * (nb / total);
  m.m2 += m2_b + delta * delta * (m.n * nb / total);
  m.n = total;
}
inline void merge(Moments& m, const Moments& o) { merge(m, o.n, o.mean, o.m2); }

inline void add(GradSums& s, const GradSums& o) {
  s.dy += o.dy;
  s.dy_xc += o.dy_xc;
  s.xc += o.xc;
}

// A chunk's (mean, M2) from its provisional mean mc and the centred sums s1 = sum(x - mc),
// s2 = sum((x - mc)^2): exact up to the rounding of the centred values.
inline void merge_chunk(Moments& m, double len, double mc, double s1, double s2) {
  const double shift = s1 / len;
  merge(m, len, mc + shift, std::max(s2 - s1 * shift, 0.0));
}

// rows layout, one chunk of rows [r0, r1) and G vectors of channels from c: the two passes
// over the chunk (the second from cache), merged into out[channel].
template <int G, typename scalar_t>
inline void rows_chunk_moments(const scalar_t* px, int64_t C, int64_t c, int64_t r0, int64_t r1,
                               Slot<Moments>* out) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const acc_t len = static_cast<acc_t>(r1 - r0);
  aVec mc[G], s1[G], s2[G];
  for (int g = 0; g < G; ++g) mc[g] = aVec(acc_t(0));
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* p = px + r * C + c;
    for (int g = 0; g < G; ++g) mc[g] += load_acc(p + g * V);
  }
  for (int g = 0; g < G; ++g) {
    mc[g] = mc[g] / aVec(len);
    s1[g] = aVec(acc_t(0));
    s2[g] = aVec(acc_t(0));
  }
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* p = px + r * C + c;
    for (int g = 0; g < G; ++g) {
      const aVec dv = load_acc(p + g * V) - mc[g];
      s1[g] += dv;
      s2[g] = at::vec::fmadd(dv, dv, s2[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    acc_t amc[V], as1[V], as2[V];
    mc[g].store(amc);
    s1[g].store(as1);
    s2[g].store(as2);
    for (int64_t l = 0; l < V; ++l)
      merge_chunk(out[c + g * V + l].v, static_cast<double>(len), amc[l], as1[l], as2[l]);
  }
}

// Per-channel mean and M2 of x (canonical layout) in float64.
template <typename scalar_t>
void channel_moments(const scalar_t* px, const Geometry& g, Moments* result) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const int64_t C = g.C, count = g.N * g.S;
  for (int64_t c = 0; c < C; ++c) result[c] = Moments();
  if (count == 0) return;

  if (!g.rows) {
    const int64_t nblocks = (count + kPlaneBlock - 1) / kPlaneBlock;
    std::vector<Slot<Moments>> partial(C * nblocks);
    at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / nblocks, b = item % nblocks;
        const int64_t kb1 = std::min(count, (b + 1) * kPlaneBlock);
        Moments m{};
        for (int64_t k0 = b * kPlaneBlock; k0 < kb1; k0 += kPlaneChunk) {
          const int64_t k1 = std::min(kb1, k0 + kPlaneChunk);
          // Pass 1 over the chunk: its provisional mean. Two accumulators per sum in both
          // passes (even and odd vectors): one would make each pass wait on the add latency.
          aVec vsum(acc_t(0)), wsum(acc_t(0));
          acc_t ssum = 0;
          for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
            const scalar_t* p = px + off;
            int64_t i = 0;
            for (; i + 2 * V <= len; i += 2 * V) {
              vsum += load_acc(p + i);
              wsum += load_acc(p + i + V);
            }
            for (; i + V <= len; i += V) vsum += load_acc(p + i);
            for (; i < len; ++i) ssum += static_cast<acc_t>(p[i]);
          });
          const acc_t len = static_cast<acc_t>(k1 - k0);
          const acc_t mc =
              (at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), vsum + wsum) + ssum) / len;
          // Pass 2, from cache: sums centred on it.
          const aVec vmc(mc);
          aVec v1(acc_t(0)), v2(acc_t(0)), w1(acc_t(0)), w2(acc_t(0));
          acc_t s1 = 0, s2 = 0;
          for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
            const scalar_t* p = px + off;
            int64_t i = 0;
            for (; i + 2 * V <= len; i += 2 * V) {
              const aVec dv = load_acc(p + i) - vmc, dw = load_acc(p + i + V) - vmc;
              v1 += dv;
              w1 += dw;
              v2 = at::vec::fmadd(dv, dv, v2);
              w2 = at::vec::fmadd(dw, dw, w2);
            }
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
          s1 += at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), v1 + w1);
          s2 += at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), v2 + w2);
          merge_chunk(m, static_cast<double>(k1 - k0), mc, s1, s2);
        }
        partial[item].v = m;
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < nblocks; ++b) merge(result[c], partial[c * nblocks + b].v);
    return;
  }

  // rows: work items are (channel block, row block); lanes run over channels.
  const int64_t M = count;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock;
  const int64_t cblock = rows_channel_block(C, nrb, V);
  const int64_t ncb = (C + cblock - 1) / cblock;
  std::vector<Slot<Moments>> partial(nrb * C);
  at::parallel_for(0, ncb * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item / ncb, cb = item % ncb;
      const int64_t c0 = cb * cblock, c1 = std::min(C, c0 + cblock);
      const int64_t r_end = std::min(M, (rb + 1) * kRowBlock);
      Slot<Moments>* out = partial.data() + rb * C;
      const int64_t nvec = (c1 - c0) / V;  // full vectors; the rest of the channels is scalar
      for (int64_t r0 = rb * kRowBlock; r0 < r_end; r0 += kRowMomentsChunk) {
        const int64_t r1 = std::min(r_end, r0 + kRowMomentsChunk);
        const acc_t len = static_cast<acc_t>(r1 - r0);
        // Groups of four vectors keep their accumulators in registers.
        int64_t j = 0;
        for (; j + 4 <= nvec; j += 4) rows_chunk_moments<4>(px, C, c0 + j * V, r0, r1, out);
        for (; j < nvec; ++j) rows_chunk_moments<1>(px, C, c0 + j * V, r0, r1, out);
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
          merge_chunk(out[c].v, static_cast<double>(len), m0, a1, a2);
        }
      }
    }
  });
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t c = 0; c < C; ++c) merge(result[c], partial[rb * C + c].v);
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes (see Form): one read of each input and one write.
//
// The loops take their pointers as plain function arguments, never through a lambda's captured
// references: at::vec's stores are may_alias, so a store through `out` could change a captured
// pointer as far as the compiler knows, and it reloaded every pointer after every store (the
// loop ran at half speed).

constexpr int64_t kElementGrain = 16384;

// The value of Form from acc_t vectors of x and dy (each unused by one Form).
template <Form kForm, typename aVec>
inline aVec form_value(const aVec& x, const aVec& dy, const aVec& m, const aVec& a, const aVec& b,
                       const aVec& k) {
  if constexpr (kForm == Form::kAffine) {
    return at::vec::fmadd(x - m, a, b);
  } else if constexpr (kForm == Form::kGrad) {
    return at::vec::fmadd(dy, k, at::vec::fmadd(x - m, a, b));
  } else {
    return dy * k;
  }
}

// One vector of values from index i, with the coefficient vectors of its channels.
template <typename scalar_t, Form kForm, bool kMasked>
inline void elementwise_vec(scalar_t* po, const scalar_t* px, const scalar_t* pg,
                            const scalar_t* pz, int64_t i, const Vectorized<acc_type<scalar_t>>& m,
                            const Vectorized<acc_type<scalar_t>>& a,
                            const Vectorized<acc_type<scalar_t>>& b,
                            const Vectorized<acc_type<scalar_t>>& k) {
  Vectorized<acc_type<scalar_t>> x, dy;
  if constexpr (kForm != Form::kScale) x = load_acc(px + i);
  if constexpr (kForm != Form::kAffine) dy = load_grad<kMasked>(pg, pz, i);
  store_acc(po + i, form_value<kForm>(x, dy, m, a, b, k));
}

// half / bfloat16: 2 * aVec::size() values, one load and one store of Vectorized<scalar_t>,
// converted once each way (the values and the arithmetic are elementwise_vec's, twice).
template <typename scalar_t, Form kForm, bool kMasked>
inline void elementwise_vec2(scalar_t* po, const scalar_t* px, const scalar_t* pg,
                             const scalar_t* pz, int64_t i, const Vectorized<float>& m,
                             const Vectorized<float>& a, const Vectorized<float>& b,
                             const Vectorized<float>& k) {
  Vectorized<float> x0, x1, g0, g1;
  if constexpr (kForm != Form::kScale)
    std::tie(x0, x1) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(px + i));
  if constexpr (kForm != Form::kAffine)
    std::tie(g0, g1) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(pg + i));
  if constexpr (kMasked) {
    const auto [z0, z1] =
        at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(pz + i));
    g0 = relu_masked(g0, z0);
    g1 = relu_masked(g1, z1);
  }
  at::vec::convert_from_float<scalar_t>(form_value<kForm>(x0, g0, m, a, b, k),
                                        form_value<kForm>(x1, g1, m, a, b, k))
      .store(po + i);
}

// One value (the scalar tails), with its channel's coefficients.
template <typename scalar_t, Form kForm, bool kMasked>
inline void elementwise_one(scalar_t* po, const scalar_t* px, const scalar_t* pg,
                            const scalar_t* pz, int64_t i, acc_type<scalar_t> m,
                            acc_type<scalar_t> a, acc_type<scalar_t> b, acc_type<scalar_t> k) {
  using acc_t = acc_type<scalar_t>;
  acc_t v;
  if constexpr (kForm == Form::kAffine) {
    v = fmadd_one(static_cast<acc_t>(px[i]) - m, a, b);
  } else if constexpr (kForm == Form::kGrad) {
    v = fmadd_one(grad_one<kMasked>(pg, pz, i), k,
                  fmadd_one(static_cast<acc_t>(px[i]) - m, a, b));
  } else {
    v = grad_one<kMasked>(pg, pz, i) * k;
  }
  po[i] = static_cast<scalar_t>(v);
}

// Values [i, stop) of one channel, with its coefficients: pairs of vectors (half / bfloat16),
// vectors, then the scalar tail. Plain arguments (see the note above).
template <typename scalar_t, Form kForm, bool kMasked>
void elementwise_run(scalar_t* po, const scalar_t* px, const scalar_t* pg, const scalar_t* pz,
                     int64_t i, int64_t stop, acc_type<scalar_t> m, acc_type<scalar_t> a,
                     acc_type<scalar_t> b, acc_type<scalar_t> k) {
  using aVec = Vectorized<acc_type<scalar_t>>;
  constexpr int64_t V = aVec::size();
  const aVec vm(m), va(a), vb(b), vk(k);
  if constexpr (!std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    for (; i + 2 * V <= stop; i += 2 * V)
      elementwise_vec2<scalar_t, kForm, kMasked>(po, px, pg, pz, i, vm, va, vb, vk);
  }
  for (; i + V <= stop; i += V)
    elementwise_vec<scalar_t, kForm, kMasked>(po, px, pg, pz, i, vm, va, vb, vk);
  for (; i < stop; ++i) elementwise_one<scalar_t, kForm, kMasked>(po, px, pg, pz, i, m, a, b, k);
}

// planes layout: runs of S values share one channel's coefficients; values [begin, end).
template <typename scalar_t, Form kForm, bool kMasked>
void elementwise_planes(scalar_t* po, const scalar_t* px, const scalar_t* pg, const scalar_t* pz,
                        int64_t C, int64_t S, Coeffs<acc_type<scalar_t>> co, int64_t begin,
                        int64_t end) {
  int64_t i = begin;
  while (i < end) {
    const int64_t run = i / S;
    const int64_t c = run % C;
    const int64_t stop = std::min(end, (run + 1) * S);
    elementwise_run<scalar_t, kForm, kMasked>(po, px, pg, pz, i, stop, co.m[c], co.a[c], co.b[c],
                                              co.k[c]);
    i = stop;
  }
}

// rows layout: rows [begin, end) of C channels. Uncentred (co.m == nullptr, the caller checked
// the conditioning): kAffine is y = x * a + b, kGrad is dx = dy * k + x * a + b.
template <typename scalar_t, Form kForm, bool kMasked, bool kCentred>
void elementwise_rows(scalar_t* po, const scalar_t* px, const scalar_t* pg, const scalar_t* pz,
                      int64_t C, Coeffs<acc_type<scalar_t>> co, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const int64_t nvec = C / V;
  const aVec zero(acc_t(0));
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = r * C;
    for (int64_t j = 0; j < nvec; ++j) {
      const int64_t c = j * V;
      const aVec m = kCentred ? aVec::loadu(co.m + c) : zero;
      const aVec a = kForm == Form::kScale ? zero : aVec::loadu(co.a + c);
      const aVec b = kForm == Form::kScale ? zero : aVec::loadu(co.b + c);
      const aVec k = kForm == Form::kAffine ? zero : aVec::loadu(co.k + c);
      elementwise_vec<scalar_t, kForm, kMasked>(po, px, pg, pz, base + c, m, a, b, k);
    }
    for (int64_t c = nvec * V; c < C; ++c)
      elementwise_one<scalar_t, kForm, kMasked>(po, px, pg, pz, base + c,
                                                kCentred ? co.m[c] : acc_t(0),
                                                kForm == Form::kScale ? acc_t(0) : co.a[c],
                                                kForm == Form::kScale ? acc_t(0) : co.b[c],
                                                kForm == Form::kAffine ? acc_t(0) : co.k[c]);
  }
}

template <typename scalar_t, Form kForm, bool kMasked>
void elementwise(scalar_t* po, const scalar_t* px, const scalar_t* pg, const scalar_t* pz,
                 const Geometry& g, const Coeffs<acc_type<scalar_t>>& co) {
  static_assert(!(kMasked && kForm == Form::kAffine), "the affine pass reads no dy to mask");
  const int64_t C = g.C, S = g.S, numel = g.N * g.C * g.S;
  if (numel == 0) return;
  if (!g.rows) {
    at::parallel_for(0, numel, kElementGrain, [=](int64_t begin, int64_t end) {
      elementwise_planes<scalar_t, kForm, kMasked>(po, px, pg, pz, C, S, co, begin, end);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(C, 1));
  const bool centred = kForm != Form::kScale && co.m != nullptr;
  at::parallel_for(0, g.N * g.S, grain, [=](int64_t begin, int64_t end) {
    if (centred)
      elementwise_rows<scalar_t, kForm, kMasked, true>(po, px, pg, pz, C, co, begin, end);
    else
      elementwise_rows<scalar_t, kForm, kMasked, false>(po, px, pg, pz, C, co, begin, end);
  });
}

}  // namespace BRN_CPU_ISA
}  // namespace cpu
}  // namespace batchrenorm

// The gradient reductions and the one-pass NCHW backward, on the helpers above.
#include "cpu/batchrenorm_cpu_kernels_grad.h"

namespace batchrenorm {
namespace cpu {
namespace BRN_CPU_ISA {

#define BRN_INSTANTIATE_MASKED(T, kMasked)                                                    \
  template void channel_grad_sums<T, true, kMasked>(const T*, const T*, const T*,              \
                                                    const Geometry&, const acc_type<T>*,       \
                                                    GradSums*);                                \
  template void channel_grad_sums<T, false, kMasked>(const T*, const T*, const T*,             \
                                                     const Geometry&, const acc_type<T>*,      \
                                                     GradSums*);                               \
  template void elementwise<T, Form::kGrad, kMasked>(T*, const T*, const T*, const T*,         \
                                                     const Geometry&,                          \
                                                     const Coeffs<acc_type<T>>&);              \
  template void elementwise<T, Form::kScale, kMasked>(T*, const T*, const T*, const T*,        \
                                                      const Geometry&,                         \
                                                      const Coeffs<acc_type<T>>&);             \
  template void grad_planes_fused<T, kMasked>(T*, const T*, const T*, const T*,                \
                                              const Geometry&, const acc_type<T>*,             \
                                              GradCoeffFn<acc_type<T>>, GradSums*);

#define BRN_INSTANTIATE(T)                                                                    \
  template void channel_moments<T>(const T*, const Geometry&, Moments*);                       \
  template void elementwise<T, Form::kAffine, false>(T*, const T*, const T*, const T*,         \
                                                     const Geometry&,                          \
                                                     const Coeffs<acc_type<T>>&);              \
  BRN_INSTANTIATE_MASKED(T, false)                                                             \
  BRN_INSTANTIATE_MASKED(T, true)

BRN_INSTANTIATE(float)
BRN_INSTANTIATE(double)
BRN_INSTANTIATE(c10::Half)
BRN_INSTANTIATE(c10::BFloat16)
#undef BRN_INSTANTIATE
#undef BRN_INSTANTIATE_MASKED

}  // namespace BRN_CPU_ISA
}  // namespace cpu
}  // namespace batchrenorm
