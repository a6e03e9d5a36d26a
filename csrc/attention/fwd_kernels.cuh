// FlashAttention-2 forward with tensor cores (sm80+): one CTA per (query block of 16·W rows, head, batch), W warps
// each owning 16 query rows; K/V tiles of BN keys double-buffered in shared memory through cp.async; online
// softmax in fp32 and base 2 (exp2f, scale folded with log2 e). Output o_i = Σ_j p_ij v_j and lse2_i (+inf and
// o_i = 0 for a row with no visible key). With dropout the normaliser l_i = Σ_j p_ij counts every weight, the
// accumulator sums p_ij·keep_ij·v_j, and o_i = acc_i / (l_i (1 − p)). Packed batches: the grid covers
// max_seqlen_q; a CTA past its sequence's end returns at once. Local attention: only the key tiles that meet the
// window of some row of the block are visited (Window::key_tiles); scores with soft cap and ALiBi (Scores).
// Split-KV (p.num_splits = S > 1): blockIdx.x = query block · S + split; each CTA takes one run of its block's key
// tiles and writes fp32 partials to the workspace (params.h), which combine_kernel (fwd.cu) merges.
// Packed GQA (p.pack_gqa = G > 1): blockIdx.y is a kv head and the CTA's rows r are query r / G of its query head
// hk·G + r % G (PackedRows), so that the group's heads share each K/V tile.
// Semantics: fastattn/triton/attention.py (_fwd_kernel).
// Included by instances/fwd_d<D>.cu, one head dim per file.
#pragma once
#include "kernel_common.cuh"

namespace fastattn {
namespace attn {
namespace {

// BIAS_MASK: p.bias or p.mask is set; DROPOUT: p.dropout_p > 0; MODS: softcap or ALiBi is on (template flags: each
// costs registers even when skipped at run time). D <= 64 without dropout: at most 128 registers, so that two CTAs
// share an SM (the packed-batch bookkeeping had pushed D = 64 to 136 registers, one CTA per SM; ptxas reaches 128
// without spills).
template <typename T, int D, int NW, int BN, bool BIAS_MASK, bool DROPOUT, bool MODS>
__global__ void __launch_bounds__(NW * 32, (D <= 64 && !DROPOUT) ? 2 : 1) fwd_kernel(const AttnParams p) {
  constexpr int BM = 16 * NW, NTH = NW * 32, P = D + 8;
  constexpr int NTS = BN / 8;  // n-tiles of a warp's score tile (16 x BN)
  constexpr int NTO = D / 8;   // n-tiles of a warp's output tile (16 x D)
  FASTATTN_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][P]
  T* sK = sQ + BM * P;                 // [2][BN][P]
  T* sV = sK + 2 * BN * P;             // [2][BN][P]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n_split = p.num_splits, split = blockIdx.x % n_split;
  // Dropout is never packed (check_common); the rows are formed from p where used, not held across the loop.
  const auto packed = [](const AttnParams& p) { return DROPOUT ? PackedRows() : PackedRows(p); };
  const PackedRows rows = packed(p);
  const int m0 = blockIdx.x / n_split * BM, h = blockIdx.y * rows.G, b = blockIdx.z;  // h: the first row's head
  const Seq seq(p, b);
  const int n_rows = seq.q_len * rows.G;
  if (m0 >= n_rows) return;  // past the end of a packed sequence: these rows belong to the next one
  // Packed GQA needs a bias / mask broadcast over heads (check_common): those of head h serve every row.
  const Scores<T> sc(p, b, h, seq);
  // Key tiles outside the window of every row of the block (past kv_len, right of the last row's diagonal +
  // right, left of the first row's diagonal − left) are never visible: not visited; nor those a bool mask hides
  // at either end of the rest (mask_ranges_kernel).
  KeyTiles<T, BM, BN, D, NTH> keys(p, b, h, m0, seq, sc.win, rows);
  if constexpr (BIAS_MASK) keys.use_mask_ranges(p, blockIdx.y, m0, gridDim.y, p.Lq * rows.G);
  // A split takes the split-th run of ceil(count / S) tiles (none for the last runs when S > count).
  const int per = (keys.count + n_split - 1) / n_split;
  const int n_first = keys.first + split * per, nblocks = max(0, min(per, keys.count - split * per));
  const DropoutMask drop(p, b, h);

  load_rows_async<T, BM, D, NTH>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.q0 * p.q_sl,
                                 [&](int r) { return rows.offset(r, p.q_sh, p.q_sl); }, m0, n_rows, tid);
  if (nblocks > 0) keys.load(p, sK, sV, n_first, tid);
  cp_async_commit();

  float acc[NTO][4];
  zero(acc);
  // Running max (base-2 units, identical in the 4 threads of a quad) and per-thread partial sums of rows
  // g and g + 8 of the warp's tile.
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int it = 0; it < nblocks; ++it) {
    const int st = it & 1;
    // Prefetch the next K/V tile into the other stage (freed by the barrier that ended the last iteration).
    const int n0 = (n_first + it) * BN;  // first key of this tile
    if (it + 1 < nblocks) keys.load(p, sK + (st ^ 1) * BN * P, sV + (st ^ 1) * BN * P, n_first + it + 1, tid);
    cp_async_commit();  // possibly empty: keeps one group per iteration
    cp_async_wait<1>();  // all but the newest group: this stage (and Q) landed
    __syncthreads();

    float s[NTS][4];
    zero(s);
    gemm_ss<T, NTS, D>(s, sQ, P, warp * 16, sK + st * BN * P, P, 0, lane);
    sc.template apply<BIAS_MASK, MODS, false>(s, m0 + warp * 16, n0, lane, nullptr, packed(p).mul, packed(p).shift);

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(row_max[r], mx);
      // While a row has seen no visible key its max is −inf: subtract 0 so that exp2(−inf) = 0, never NaN.
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_max[r] - m_safe);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_safe);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_safe);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;  // the normaliser counts dropped weights too
#pragma unroll
      for (int dt = 0; dt < NTO; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
    }

    if constexpr (DROPOUT) {  // only the weights that reach V are dropped (never packed: rows are queries of head h)
      const int row = m0 + warp * 16 + (lane >> 2);
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!drop.keep(row + (e >> 1) * 8, n0 + nt * 8 + 2 * (lane & 3) + (e & 1))) s[nt][e] = 0.f;
    }

    uint32_t pa[NTS / 2][4];
    c_to_a<T, NTS>(pa, s);
    gemm_rs<T, NTO, BN>(acc, pa, sV + st * BN * P, P, 0, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // nothing may land in shared memory after the CTA exits (Q when nblocks == 0)

  float inv[2];
  const float keep_scale = DROPOUT ? 1.f - p.dropout_p : 1.f;  // kept weights count 1 / (1 − p)
  // A split writes its partials (rows within the sequence; [S, B, H, Lq] as unpacked, so that combine_kernel
  // need not know the packing); a row it saw no key of weighs 0 there (lse −inf).
  const bool partial = p.num_splits > 1;
  const int h0 = blockIdx.y * packed(p).G;  // h again: not held in a register across the loop
  float* part_o = static_cast<float*>(p.workspace);
  const int64_t part_h0 = (static_cast<int64_t>(blockIdx.x % p.num_splits) * p.B + b) * p.H + h0;
  float* lse = partial ? part_o + static_cast<int64_t>(p.num_splits) * p.B * p.H * p.Lq * D : p.lse;
  // Row r's index in lse (or the partial lse) and in the partial outputs' rows: head h + head(r), query pos(r).
  const auto lse_index = [&](int r) {
    return (partial ? (part_h0 + rows.head(r)) * p.Lq : seq.lse_row0(p, b, h0 + rows.head(r))) + rows.pos(r);
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(row_sum[r]);
    const bool empty = total == 0.f;
    inv[r] = empty ? 0.f : 1.f / (total * keep_scale);
    const int row = m0 + warp * 16 + (lane >> 2) + 8 * r;
    if (lse != nullptr && (lane & 3) == 0 && row < n_rows)
      lse[lse_index(row)] = empty ? (partial ? -INFINITY : INFINITY) : row_max[r] + log2f(total);
  }
  if (partial) {
    store_rows<float, NTO>(part_o, [&](int r) { return lse_index(r) * D; }, m0 + warp * 16, 0, n_rows, acc, inv[0],
                           inv[1], lane);
  } else {
    const int64_t o0 = b * p.o_sb + h0 * p.o_sh + seq.q0 * p.o_sl;
    T* o_lo = p.o_lo != nullptr ? static_cast<T*>(p.o_lo) + o0 : nullptr;
    store_rows<T, NTO>(static_cast<T*>(p.o) + o0, [&](int r) { return rows.offset(r, p.o_sh, p.o_sl); },
                       m0 + warp * 16, 0, n_rows, acc, inv[0], inv[1], lane, o_lo);
  }
}

}  // namespace

template <typename T, int D, bool NARROW>
const char* run_fwd_tiles(const AttnParams& p, cudaStream_t s) {
  constexpr int NW = FwdCfg<D, NARROW>::kWarps, BN = FwdCfg<D, NARROW>::kBlockN, BM = 16 * NW;
  const dim3 grid((fwd_rows(p) + BM - 1) / BM * p.num_splits, fwd_heads(p), p.B);
  const size_t smem = fwd_smem_bytes<T, D, NW, BN>();
  if (const char* err = launch_mask_ranges<BM, BN, true>(p, p.key_ranges, s)) return err;
  const auto kernel = pick_kernel(p.bias != nullptr || p.mask != nullptr, p.dropout_p > 0.f, score_mods(p),
                                  [](auto bm, auto dr, auto mo) {
                                    return fwd_kernel<T, D, NW, BN, decltype(bm)::value, decltype(dr)::value,
                                                      decltype(mo)::value>;
                                  });
  return launch("fwd_kernel", kernel, grid, NW * 32, smem, s, p);
}

template <typename T, int D>
const char* run_fwd(const AttnParams& p, cudaStream_t s) {
  bool narrow = false;
  if (const char* err = fwd_narrow<T, D>(narrow)) return err;
  return narrow ? run_fwd_tiles<T, D, true>(p, s) : run_fwd_tiles<T, D, false>(p, s);
}

}  // namespace attn
}  // namespace fastattn
