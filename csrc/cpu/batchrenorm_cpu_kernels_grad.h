// batchrenorm_cpu_kernels_grad.h: the CPU gradient kernels (the per-channel sums of the
// backward, and the one-pass NCHW training backward), compiled once per instruction set.
//
// Part of batchrenorm_cpu_kernels_impl.h, which includes it after the helpers and the
// elementwise passes these loops use (load_acc, for_each_run, the work partition, add,
// elementwise_run), and before the explicit instantiations; not to be included alone.
#pragma once

#ifndef BRN_CPU_ISA
#error "included by batchrenorm_cpu_kernels_impl.h only"
#endif

namespace batchrenorm {
namespace cpu {
namespace BRN_CPU_ISA {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The lane sums of three 8-float vectors in one shuffle tree.
inline std::array<float, 3> reduce3_m256(__m256 a, __m256 b, __m256 c) {
  const __m256 ab = _mm256_hadd_ps(a, b);                        // a01 a23 b01 b23 | a45 ...
  const __m256 c0 = _mm256_hadd_ps(c, _mm256_setzero_ps());      // c01 c23 0 0 | c45 c67 0 0
  const __m256 abc = _mm256_hadd_ps(ab, c0);                     // a0-3 b0-3 c0-3 0 | a4-7 ...
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(abc), _mm256_extractf128_ps(abc, 1));
  alignas(16) float out[4];
  _mm_store_ps(out, r);
  return {out[0], out[1], out[2]};
}
#endif

// The lane sums of three vectors. For float on AVX2 and AVX-512 in one shuffle tree rather
// than three (on AVX-512 the two halves of each vector added first): on a 7 x 7 map the
// horizontal reductions were a fifth of the fused backward's time. A fixed order of additions
// either way.
template <typename acc_t>
inline std::array<acc_t, 3> reduce3(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b,
                                    const Vectorized<acc_t>& c) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const auto halves = [](__m512 v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    };
    return reduce3_m256(halves(a), halves(b), halves(c));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return reduce3_m256(a, b, c);
#endif
  using aVec = Vectorized<acc_t>;
  return {at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), a),
          at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), b),
          at::vec::vec_reduce_all<acc_t>(std::plus<aVec>(), c)};
}

// planes layout, one work item: channel c's values [k0, k1), chunk by chunk, float accumulators
// flushed into float64 per chunk.
template <typename scalar_t, bool kCentre, bool kMasked>
__attribute__((always_inline)) inline GradSums plane_grad_sums(
    const scalar_t* pg, const scalar_t* pz, const scalar_t* px, const Geometry& g, int64_t c,
    int64_t kb0, int64_t kb1, acc_type<scalar_t> mc) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const aVec vm(mc);
  GradSums sums{};
  for (int64_t k0 = kb0; k0 < kb1; k0 += kPlaneChunk) {
    const int64_t k1 = std::min(kb1, k0 + kPlaneChunk);
    // Two accumulators per sum (even and odd vectors): one would make the loop wait on the
    // add's latency at every vector.
    aVec a0(acc_t(0)), a1(acc_t(0)), a2(acc_t(0)), b0(acc_t(0)), b1(acc_t(0)), b2(acc_t(0));
    acc_t s0 = 0, s1 = 0, s2 = 0;
    for_each_run(g, c, k0, k1, [&](int64_t off, int64_t len) {
      const scalar_t* p = px + off;
      const scalar_t* q = pg + off;
      const scalar_t* z = kMasked ? pz + off : nullptr;
      int64_t i = 0;
      for (; i + 2 * V <= len; i += 2 * V) {
        const aVec ga = load_grad<kMasked>(q, z, i), gb = load_grad<kMasked>(q, z, i + V);
        const aVec xa = load_acc(p + i) - vm, xb = load_acc(p + i + V) - vm;
        a0 += ga;
        b0 += gb;
        a1 = at::vec::fmadd(ga, xa, a1);
        b1 = at::vec::fmadd(gb, xb, b1);
        if constexpr (kCentre) {
          a2 += xa;
          b2 += xb;
        }
      }
      for (; i + V <= len; i += V) {
        const aVec gv = load_grad<kMasked>(q, z, i);
        const aVec xc = load_acc(p + i) - vm;
        a0 += gv;
        a1 = at::vec::fmadd(gv, xc, a1);
        if constexpr (kCentre) a2 += xc;
      }
      for (; i < len; ++i) {
        const acc_t gv = grad_one<kMasked>(q, z, i);
        const acc_t xc = static_cast<acc_t>(p[i]) - mc;
        s0 += gv;
        s1 = fmadd_one(gv, xc, s1);
        if constexpr (kCentre) s2 += xc;
      }
    });
    const std::array<acc_t, 3> r = reduce3<acc_t>(a0 + b0, a1 + b1, a2 + b2);
    sums.dy += static_cast<double>(s0 + r[0]);
    sums.dy_xc += static_cast<double>(s1 + r[1]);
    if constexpr (kCentre) sums.xc += static_cast<double>(s2 + r[2]);
  }
  return sums;
}

// x and dy together at most this (rows layout): the sums interleave four rows (see below).
constexpr int64_t kInterleaveMaxBytes = int64_t{4} << 20;

// Per channel: sum(dy), sum(dy * (x - m)) and, when kCentre, sum(x - m), in float64.
template <typename scalar_t, bool kCentre, bool kMasked>
void channel_grad_sums(const scalar_t* pg, const scalar_t* pz, const scalar_t* px,
                       const Geometry& g, const acc_type<scalar_t>* m, GradSums* result) {
  using acc_t = acc_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t V = aVec::size();
  const int64_t C = g.C, count = g.N * g.S;
  for (int64_t c = 0; c < C; ++c) result[c] = GradSums();
  if (count == 0) return;

  if (!g.rows) {
    const int64_t nblocks = (count + kPlaneBlock - 1) / kPlaneBlock;
    std::vector<Slot<GradSums>> partial(C * nblocks);
    at::parallel_for(0, C * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t c = item / nblocks, b = item % nblocks;
        partial[item].v = plane_grad_sums<scalar_t, kCentre, kMasked>(
            pg, pz, px, g, c, b * kPlaneBlock, std::min(count, (b + 1) * kPlaneBlock), m[c]);
      }
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < nblocks; ++b) add(result[c], partial[c * nblocks + b].v);
    return;
  }

  const int64_t M = count;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock;
  const int64_t cblock = rows_channel_block(C, nrb, V);
  const int64_t ncb = (C + cblock - 1) / cblock;
  std::vector<Slot<GradSums>> partial(nrb * C);
  // Four rows per accumulator load and store where the loop is bound by those stores: x and dy
  // in L2 (measured on the Intel VM: (512, 256) 0.029 -> 0.019 ms), or rows of 8 KiB and more.
  // Otherwise one row at a time: streaming from L3 or memory, the four interleaved rows of
  // 0.5-2 KiB made the loop 1.5-1.9x slower on Zen 3 (benchmarks/NOTES.md, issue 24 on AMD).
  // Either way each lane adds its rows in row order, so the sums are the same.
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(scalar_t));
  const bool interleave = 2 * M * row_bytes <= kInterleaveMaxBytes || row_bytes >= 8192;
  at::parallel_for(0, ncb * nrb, 1, [&](int64_t begin, int64_t end) {
    // Local copies: the accumulator stores below are may_alias (see elementwise), and would
    // make the compiler reload pointers it reached through the lambda's references.
    const scalar_t* const px_ = px;
    const scalar_t* const pg_ = pg;
    const scalar_t* const pz_ = pz;
    const acc_t* const m_ = m;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item / ncb, cb = item % ncb;
      const int64_t c0 = cb * cblock, c1 = std::min(C, c0 + cblock);
      const int64_t r_end = std::min(M, (rb + 1) * kRowBlock);
      Slot<GradSums>* out = partial.data() + rb * C;
      const int64_t nvec = (c1 - c0) / V;
      std::vector<acc_t> acc(3 * V * std::max<int64_t>(nvec, 1));
      for (int64_t r0 = rb * kRowBlock; r0 < r_end; r0 += kRowChunk) {
        const int64_t r1 = std::min(r_end, r0 + kRowChunk);
        // Over the item's channels kRows rows at a time (1, or 4 where `interleave`), float
        // accumulators in L1, each loaded and stored once per kRows rows.
        for (int64_t j = 0; j < nvec; ++j) {
          aVec(acc_t(0)).store(acc.data() + 3 * j * V);
          aVec(acc_t(0)).store(acc.data() + (3 * j + 1) * V);
          if constexpr (kCentre) aVec(acc_t(0)).store(acc.data() + (3 * j + 2) * V);
        }
        const auto accumulate_rows = [&](int64_t r, auto rows) {
          constexpr int64_t kRows = decltype(rows)::value;
          const scalar_t* p = px_ + r * C + c0;
          const scalar_t* q = pg_ + r * C + c0;
          const scalar_t* z = kMasked ? pz_ + r * C + c0 : nullptr;
          acc_t* A = acc.data();
          for (int64_t j = 0; j < nvec; ++j, A += 3 * V) {
            const aVec mv = aVec::loadu(m_ + c0 + j * V);
            aVec s0 = aVec::loadu(A), s1 = aVec::loadu(A + V);
            aVec s2 = kCentre ? aVec::loadu(A + 2 * V) : aVec(acc_t(0));
            for (int64_t i = 0; i < kRows; ++i) {
              const aVec gv = load_grad<kMasked>(q, z, i * C + j * V);
              const aVec xc = load_acc(p + i * C + j * V) - mv;
              s0 = s0 + gv;
              s1 = at::vec::fmadd(gv, xc, s1);
              if constexpr (kCentre) s2 = s2 + xc;
            }
            s0.store(A);
            s1.store(A + V);
            if constexpr (kCentre) s2.store(A + 2 * V);
          }
        };
        int64_t r = r0;
        if (interleave)
          for (; r + 4 <= r1; r += 4) accumulate_rows(r, std::integral_constant<int64_t, 4>());
        for (; r < r1; ++r) accumulate_rows(r, std::integral_constant<int64_t, 1>());
        for (int64_t j = 0; j < nvec; ++j) {
          const acc_t* A = acc.data() + 3 * j * V;
          for (int64_t l = 0; l < V; ++l) {
            GradSums& o = out[c0 + j * V + l].v;
            o.dy += A[l];
            o.dy_xc += A[V + l];
            if constexpr (kCentre) o.xc += A[2 * V + l];
          }
        }
        for (int64_t c = c0 + nvec * V; c < c1; ++c) {
          acc_t s0 = 0, s1 = 0, s2 = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t gv = grad_one<kMasked>(pg_, pz_, r * C + c);
            const acc_t xc = static_cast<acc_t>(px_[r * C + c]) - m_[c];
            s0 += gv;
            s1 = fmadd_one(gv, xc, s1);
            if constexpr (kCentre) s2 += xc;
          }
          out[c].v.dy += s0;
          out[c].v.dy_xc += s1;
          if constexpr (kCentre) out[c].v.xc += s2;
        }
      }
    }
  });
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t c = 0; c < C; ++c) add(result[c], partial[rb * C + c].v);
}

// Why fused: the two-pass backward (channel_grad_sums, then elementwise) reads x and dy from
// memory twice once the tensors outgrow the caches; here a channel's dx is written right after
// its sums, while its N * S <= kFusedGradMaxValues values (<= 2 MiB of x and dy in float32)
// are still in L2, as ATen's channels-first backward does. The sums are those of
// plane_grad_sums over the whole channel (chunk by chunk, as channel_grad_sums, but in one
// float64 accumulator rather than one per work item), and each channel is one task, so the
// result does not depend on the thread count.
//
// Small planes go in blocks of channels whose x and dy fit in L1 together (kFusedBlockBytes):
// the block's sums, then its coefficients, then its dx. A channel of a 7 x 7 map is a few
// vectors, so done one at a time it is one serial chain (sums, horizontal reductions, float64
// coefficients, dx); in a block the channels' chains are independent loops the core overlaps.
// Each channel's arithmetic is the same either way, so the block size changes no result.
constexpr int64_t kFusedBlockBytes = 8 * 1024;
constexpr int64_t kFusedMaxBlock = 16;

template <typename scalar_t, bool kMasked>
void grad_planes_fused(scalar_t* po, const scalar_t* pg, const scalar_t* pz, const scalar_t* px,
                       const Geometry& g, const acc_type<scalar_t>* m,
                       GradCoeffFn<acc_type<scalar_t>> coeffs, GradSums* sums) {
  using acc_t = acc_type<scalar_t>;
  const int64_t count = g.N * g.S;
  const int64_t block = std::clamp<int64_t>(
      kFusedBlockBytes / (2 * count * static_cast<int64_t>(sizeof(scalar_t))), 1,
      kFusedMaxBlock);
  at::parallel_for(0, g.C, 1, [&](int64_t begin, int64_t end) {
    acc_t cm[kFusedMaxBlock], ca[kFusedMaxBlock], cb[kFusedMaxBlock], ck[kFusedMaxBlock];
    for (int64_t c0 = begin; c0 < end; c0 += block) {
      const int64_t c1 = std::min(end, c0 + block);
      for (int64_t c = c0; c < c1; ++c)
        sums[c] = plane_grad_sums<scalar_t, true, kMasked>(pg, pz, px, g, c, 0, count, m[c]);
      coeffs.fn(coeffs.ctx, c0, c1, sums, cm, ca, cb, ck);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j = c - c0;
        for_each_run(g, c, 0, count, [&](int64_t off, int64_t len) {
          elementwise_run<scalar_t, Form::kGrad, kMasked>(po, px, pg, pz, off, off + len, cm[j],
                                                          ca[j], cb[j], ck[j]);
        });
      }
    }
  });
}

}  // namespace BRN_CPU_ISA
}  // namespace cpu
}  // namespace batchrenorm
