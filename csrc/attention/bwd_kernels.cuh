// FlashAttention-2 backward with tensor cores (sm80+), in deterministic kernels and no atomics:
//   1. delta_kernel: D_i = Σ_d do_id·o_id − log2(e)·dlse2_i into the workspace ([B, H, Lq] fp32), by the MMAs
//      that form dP (see there);
//   2. dkdv_kernel: one CTA per (key block of 16·W keys, kv head, batch), W warps each owning 16 keys; it loops
//      over the query heads of the GQA group and over the query tiles, recomputing Sᵀ = K·Qᵀ and
//      dPᵀ = V·dOᵀ, and accumulates dV = Pᵀ·dO and dK = scale·dSᵀ·Q in registers (fixed order);
//   3. dq_kernel: one CTA per (query block of 16·W rows, head, batch), looping over the visible key tiles,
//      recomputing S and dP and accumulating dQ = scale·dS·K in registers; it also writes dS, the gradient of a
//      full-size bias, when p.ds is set;
//   4. dbias_kernel, for a bias broadcast over some dims: one CTA per tile of dbias summing dS over them.
// p_ij = exp2(s_ij·log2 e − lse2_i) (0 where invisible or for an empty row, whose lse2 is +inf),
// ds_ij = p_ij (dp_ij − D_i). Dropout (keep_ij regenerated from the forward's Philox counters, r = 1 / (1 − p)):
// dV uses p_ij·keep_ij·r, and dp_ij becomes keep_ij·r·dp_ij before ds, in fp32, as D_i = do_i·o_i holds the scale
// (with p.o_lo, D holds o's rounding too: dp from r·v rounded to T would err by as much).
// Packed batches: CTAs past their sequence's end return at once; D lives in the workspace as [B, H, max_seqlen_q].
// Local attention: the dK/dV kernel visits the query tiles that meet the window of some key of its block
// (Window::query_tiles), the dQ kernel the forward's key tiles; with the soft cap, ds (the bias gradient) is
// multiplied by the cap's derivative 1 − tanh² before it reaches dK and dQ.
// Semantics: fastattn/triton/attention.py (_bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_dbias_kernel).
// Included by instances/bwd_d<D>.cu, one head dim per file.
#pragma once
#include "kernel_common.cuh"

namespace fastattn {
namespace attn {
namespace {

// ------------------------------------------------------------------------------------------- delta
constexpr int kDeltaWarps = 4;  // 16 query rows each

template <typename T, int D>
constexpr size_t delta_smem_bytes() {
  return static_cast<size_t>(2 * 16 * kDeltaWarps) * (D + 8) * sizeof(T);
}

// delta[(b·H + h)·Lq + i] for the sequence's query rows i (the rest is never read). D_i = do_i·o_i is the
// diagonal of the warp's 16 x 16 tile dO·Oᵀ, formed by gemm_ss as dp_ij = do_i·v_j is in the dQ and dK/dV
// kernels (the same products summed by the same MMAs in the same k order): a row with one visible key has
// o_i = v_j bitwise, so dp_ij − D_i is exactly 0, and so are its gradients. (A warp-shuffle dot product here
// left ~1e-6 in dq and dk of such rows; the CPU emulator showed it.) With p.o_lo, the diagonal of dO·O_loᵀ is
// added: from the rounded o alone, D errs by up to ~2⁻¹¹·|do_i|·|o_i| (fp16), which ds_ij = p_ij (dp_ij − D_i)
// passes on whole where one p_ij dominates the row (an attention sink), while the reference's softmax backward
// shrinks its own rounding by 1 − p_ij there (README, Numerics). o_lo = 0 in a row with one visible key.
template <typename T, int D>
__global__ void __launch_bounds__(kDeltaWarps * 32) delta_kernel(const AttnParams p, float* delta) {
  constexpr int BM = 16 * kDeltaWarps, NTH = kDeltaWarps * 32, P = D + 8;
  FASTATTN_DYNAMIC_SMEM(smem);
  T* sdO = reinterpret_cast<T*>(smem);  // [BM][P]
  T* sO = sdO + BM * P;                 // [BM][P]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const Seq seq(p, b);
  if (m0 >= seq.q_len) return;  // past the end of a packed sequence
  load_tile_async<T, BM, D, NTH>(sdO, static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.q0 * p.do_sl,
                                 p.do_sl, m0, seq.q_len, tid);
  float dd[2][4];
  zero(dd);
  // dO·Oᵀ, then dO·O_loᵀ into the same accumulators (O_lo = 0 adds exactly nothing)
  for (int part = 0; part < (p.o_lo != nullptr ? 2 : 1); ++part) {
    if (part) __syncthreads();  // every warp has read its rows of O: the tile takes O_lo
    load_tile_async<T, BM, D, NTH>(sO, static_cast<const T*>(part ? p.o_lo : p.o) + b * p.o_sb + h * p.o_sh +
                                           seq.q0 * p.o_sl, p.o_sl, m0, seq.q_len, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    gemm_ss<T, 2, D>(dd, sdO, P, warp * 16, sO, P, warp * 16, lane);
  }
  // The diagonal: (g, g) in n-tile 0 and (g + 8, g + 8) in n-tile 1, each at column 2t + (g & 1) of the thread
  // whose t = g / 2 (g = lane / 4, t = lane % 4).
  const int g = lane >> 2;
  if ((lane & 3) != (g >> 1)) return;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h, lse0 = seq.lse_row0(p, b, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= seq.q_len) continue;
    const float dot = (g & 1) ? dd[r][2 * r + 1] : dd[r][2 * r];  // constant indices: dd stays in registers
    delta[bh * p.Lq + row] = p.dlse != nullptr ? dot - kLog2e * p.dlse[lse0 + row] : dot;
  }
}

// ds = p (dp − D), exactly 0 where p = 0 (even if dp is not finite). With dropout also where p = 1 exactly: there
// ds_ij = p_ij Σ_{k≠j} p_ik (dp_ij − dp_ik) lies below fp32's resolution, and in a row with one visible key it is
// exactly 0, but dp − D would keep a rounding (dp = r·(do·v) in fp32, D from o = r·v rounded to T).
template <bool DROPOUT>
__device__ __forceinline__ float weight_grad(float pr, float dp, float delta) {
  return pr != 0.f && !(DROPOUT && pr == 1.f) ? pr * (dp - delta) : 0.f;
}

// With the soft cap on, each warp keeps the cap's derivative of its 16 x N score tile in shared memory between
// the score (Scores::apply, before the dP GEMM) and ds (after it): N·16 floats per warp.
template <int NW, int N>
constexpr size_t dcap_smem_bytes(bool softcap) {
  return softcap ? static_cast<size_t>(NW) * 16 * N * sizeof(float) : 0;
}

// ------------------------------------------------------------------------------------------- dK, dV
// Per head dim: warps W (key block 16·W), query tile BM, and DSPLIT passes over the query tiles, each
// accumulating D / DSPLIT columns of dK and dV (D = 256 would not fit both accumulators in registers; its
// second pass recomputes Sᵀ and dPᵀ). Shared memory (2·16W + 4·BM)·(D + 8)·2 + 16·BM bytes:
// D=32: 31 KB, 64: 55 KB, 96: 79 KB, 128: 69 KB, 256: 100 KB; with the soft cap 64·W·BM more (dcap_smem_bytes):
// 16 KB (8 KB for D = 128, 4 KB for D = 256).
template <int D> struct DkdvCfg { static constexpr int kWarps = 4, kBlockM = 64, kSplit = 1; };
template <> struct DkdvCfg<128> { static constexpr int kWarps = 4, kBlockM = 32, kSplit = 1; };
template <> struct DkdvCfg<256> { static constexpr int kWarps = 4, kBlockM = 16, kSplit = 2; };

template <typename T, int D, int NW, int BM>
constexpr size_t dkdv_smem_bytes(bool softcap) {
  return static_cast<size_t>(2 * 16 * NW + 4 * BM) * (D + 8) * sizeof(T) + 4 * BM * sizeof(float) +
         dcap_smem_bytes<NW, BM>(softcap);
}

template <typename T, int D, int NW, int BM, int DSPLIT, bool BIAS_MASK, bool DROPOUT, bool MODS>
__global__ void __launch_bounds__(NW * 32) dkdv_kernel(const AttnParams p) {
  constexpr int BN = 16 * NW, NTH = NW * 32, P = D + 8, DC = D / DSPLIT;
  constexpr int NTS = BM / 8;  // n-tiles of a warp's 16 x BM tile of Sᵀ / dPᵀ
  constexpr int NTD = DC / 8;  // n-tiles of a warp's 16 x DC tile of dK / dV
  FASTATTN_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);                     // [BN][P]
  T* sV = sK + BN * P;                                    // [BN][P]
  T* sQ = sV + BN * P;                                    // [2][BM][P]
  T* sdO = sQ + 2 * BM * P;                               // [2][BM][P]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * P);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                          // [2][BM]
  float* sDcap = sDelta + 2 * BM;                         // [W][NTS·4][32] with the soft cap (see apply)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int group = p.H / p.Hkv;
  const Seq seq(p, b);
  if (n0 >= seq.k_len) return;  // past the end of a packed sequence: these rows belong to the next one
  const int kv_len = seq.kv_len;
  const int shift = p.bottom_right ? kv_len - seq.q_len : 0;
  const float* delta = static_cast<const float*>(p.workspace);
  const float keep_scale = DROPOUT ? 1.f / (1.f - p.dropout_p) : 1.f;

  // Query rows whose window misses this key block are not visited (Window::query_tiles, as Triton's
  // _query_range): query tiles m_begin + t·BM, t < nm; a block of padding keys sees nothing.
  // With a bool mask, nor the tiles it hides at either end of the rest (mask_ranges_kernel).
  int m_begin, nm;
  Window(p, seq.q_len, kv_len, shift).query_tiles(n0, BN, BM, m_begin, nm);
  if (BIAS_MASK && p.query_ranges != nullptr) {
    const int64_t i = 2 * ((static_cast<int64_t>(b) * p.Hkv + hk) * ((p.Lk + BN - 1) / BN) + blockIdx.x);
    m_begin = p.query_ranges[i] * BM;
    nm = p.query_ranges[i + 1];
  }
  const int total = group * nm;  // (query head, query tile) steps

  load_tile_async<T, BN, D, NTH>(sK, static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + seq.k0 * p.k_sl, p.k_sl,
                                 n0, kv_len, tid);
  load_tile_async<T, BN, D, NTH>(sV, static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + seq.k0 * p.v_sl, p.v_sl,
                                 n0, kv_len, tid);
  cp_async_commit();

  // Step it: query head hk·group + it / nm, query rows from m_begin + (it % nm)·BM.
  auto load_step = [&](int it, int st) {
    const int h = hk * group + it / nm;
    const int mq0 = m_begin + (it % nm) * BM;
    load_tile_async<T, BM, D, NTH>(sQ + st * BM * P,
                                   static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.q0 * p.q_sl, p.q_sl,
                                   mq0, seq.q_len, tid);
    load_tile_async<T, BM, D, NTH>(sdO + st * BM * P,
                                   static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.q0 * p.do_sl,
                                   p.do_sl, mq0, seq.q_len, tid);
    const int64_t lse0 = seq.lse_row0(p, b, h), delta0 = (static_cast<int64_t>(b) * p.H + h) * p.Lq;
    for (int i = tid; i < BM; i += NTH) {
      const int row = mq0 + i;
      const bool ok = row < seq.q_len;
      sLse[st * BM + i] = ok ? p.lse[lse0 + row] : INFINITY;  // +inf: p = 0 for padding rows
      sDelta[st * BM + i] = ok ? delta[delta0 + row] : 0.f;
    }
  };

  for (int pass = 0; pass < DSPLIT; ++pass) {
    float dk[NTD][4], dv[NTD][4];
    zero(dk);
    zero(dv);
    if (total > 0) load_step(0, 0);
    cp_async_commit();

    for (int it = 0; it < total; ++it) {
      const int st = it & 1;
      if (it + 1 < total) load_step(it + 1, st ^ 1);  // the other stage was freed by the last barrier
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // this stage's Q, dO (cp.async) and lse, delta (plain stores) are visible

      const int h = hk * group + it / nm;
      const int mq0 = m_begin + (it % nm) * BM;
      const Scores<T> sc(p, b, h, seq);
      const DropoutMask drop(p, b, h);
      const T* sQs = sQ + st * BM * P;
      const T* sdOs = sdO + st * BM * P;
      const float* lse_s = sLse + st * BM;
      const float* delta_s = sDelta + st * BM;

      // Sᵀ to scores (and the soft cap's derivative to dcap), dPᵀ, then per element p, the weight for dV and
      // ds·dcap for dK.
      const bool capped = MODS && p.softcap > 0.f;
      float* dcap = capped ? sDcap + warp * NTS * 4 * 32 : nullptr;
      float s[NTS][4], dp[NTS][4];
      zero(s);
      gemm_ss<T, NTS, D>(s, sK, P, warp * 16, sQs, P, 0, lane);
      sc.template apply<BIAS_MASK, MODS, true>(s, n0 + warp * 16, mq0, lane, dcap);
      // The forward's dropout mask of query mq0 + col, key n0 + this thread's row, as bits (nt·4 + e), drawn
      // before the dP GEMM (its registers still free) in a loop kept rolled (one Philox at a time, not 4·NTS
      // interleaved by the scheduler).
      uint32_t kept_bits = 0;
      if constexpr (DROPOUT) {
#pragma unroll 1
        for (int k = 0; k < NTS * 4; ++k) {
          const int nt = k >> 2, e = k & 3;
          if (drop.keep(mq0 + nt * 8 + 2 * (lane & 3) + (e & 1), n0 + warp * 16 + (lane >> 2) + (e >> 1) * 8))
            kept_bits |= 1u << k;
        }
      }
      zero(dp);
      gemm_ss<T, NTS, D>(dp, sV, P, warp * 16, sdOs, P, 0, lane);
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * (lane & 3) + (e & 1);  // query row within the tile
          const float pr = exp2f(s[nt][e] - lse_s[col]);
          float dpe = dp[nt][e], pv = pr;  // dp and the weight that reaches dV
          if constexpr (DROPOUT) {
            const bool kept = (kept_bits >> (nt * 4 + e)) & 1u;
            pv = kept ? pr * keep_scale : 0.f;
            dpe = kept ? dpe * keep_scale : 0.f;
          }
          s[nt][e] = pv;
          // ds (times the cap's derivative), exactly 0 where p = 0 (even if dp is not finite); see weight_grad
          float ds = weight_grad<DROPOUT>(pr, dpe, delta_s[col]);
          if (capped) ds *= dcap[(nt * 4 + e) * 32 + lane];
          dp[nt][e] = ds;
        }

      uint32_t a[NTS / 2][4];
      c_to_a<T, NTS>(a, s);
      gemm_rs<T, NTD, BM>(dv, a, sdOs, P, pass * DC, lane);
      c_to_a<T, NTS>(a, dp);
      gemm_rs<T, NTD, BM>(dk, a, sQs, P, pass * DC, lane);
      __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // Keys in [kv_len, k_len) and keys no query sees get 0; none of the next packed sequence's rows is written.
    const Seq::Rows rows = Seq::reread<true>(p, b);  // seq.k0, seq.k_len
    store_c<T, NTD>(static_cast<T*>(p.dk) + b * p.dk_sb + hk * p.dk_sh + rows.start * p.dk_sl, p.dk_sl,
                    n0 + warp * 16, pass * DC, rows.len, dk, p.scale, p.scale, lane);
    store_c<T, NTD>(static_cast<T*>(p.dv) + b * p.dv_sb + hk * p.dv_sh + rows.start * p.dv_sl, p.dv_sl,
                    n0 + warp * 16, pass * DC, rows.len, dv, 1.f, 1.f, lane);
  }
  cp_async_wait<0>();  // K / V when total == 0
}

// ------------------------------------------------------------------------------------------- dS
// ds_ij = p_ij (dp_ij − D_i) of a warp's 16 x 8·NTS tile (dQ and dbias kernels): query rows m0 + 16·warp ..,
// keys n0 .., from the CTA's Q, dO tiles ([16·W][D + 8], rows from m0) and the key tile's K, V ([8·NTS][D + 8]) in
// shared memory, recomputing S (its soft cap's derivative to dcap when non-null, see Scores::apply) and dP.
// lse_r, delta_r: lse2 and D of the thread's rows g and g + 8. Exactly 0 where p = 0 (even if dp is not finite).
template <typename T, int NTS, int D, bool BIAS_MASK, bool DROPOUT, bool MODS>
__device__ __forceinline__ void score_grad(float (&ds)[NTS][4], const Scores<T>& sc, const DropoutMask& drop,
                                           const T* sQ, const T* sdO, const T* sK, const T* sV,
                                           int warp, int m0, int n0, const float (&lse_r)[2],
                                           const float (&delta_r)[2], float* dcap, int lane) {
  constexpr int P = D + 8;
  float s[NTS][4];
  zero(s);
  gemm_ss<T, NTS, D>(s, sQ, P, warp * 16, sK, P, 0, lane);
  sc.template apply<BIAS_MASK, MODS, false>(s, m0 + warp * 16, n0, lane, dcap);
  uint32_t kept_bits = 0;  // the dropout mask as bits (nt·4 + e), drawn before the dP GEMM (see dkdv_kernel)
  if constexpr (DROPOUT) {
#pragma unroll 1
    for (int k = 0; k < NTS * 4; ++k) {
      const int nt = k >> 2, e = k & 3;
      if (drop.keep(m0 + warp * 16 + (lane >> 2) + 8 * (e >> 1), n0 + nt * 8 + 2 * (lane & 3) + (e & 1)))
        kept_bits |= 1u << k;
    }
  }
  zero(ds);
  gemm_ss<T, NTS, D>(ds, sdO, P, warp * 16, sV, P, 0, lane);  // dP
  const float keep_scale = DROPOUT ? 1.f / (1.f - drop.p) : 1.f;  // r, as the dK/dV kernel's
#pragma unroll
  for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      const float pr = exp2f(s[nt][e] - lse_r[r]);
      float dpe = ds[nt][e];
      if constexpr (DROPOUT) dpe = (kept_bits >> (nt * 4 + e)) & 1u ? dpe * keep_scale : 0.f;
      ds[nt][e] = weight_grad<DROPOUT>(pr, dpe, delta_r[r]);
    }
}

// lse2 and D of the thread's query rows g and g + 8 of a warp's 16 rows from row0 (g = lane / 4); rows past the
// sequence get lse2 = +inf (p = 0) and D = 0.
__device__ __forceinline__ void row_stats(const AttnParams& p, const Seq& seq, int b, int h, int row0, int lane,
                                          float (&lse_r)[2], float (&delta_r)[2]) {
  const float* delta = static_cast<const float*>(p.workspace);
  const int64_t lse0 = seq.lse_row0(p, b, h), delta0 = (static_cast<int64_t>(b) * p.H + h) * p.Lq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + (lane >> 2) + 8 * r;
    const bool ok = row < seq.q_len;
    lse_r[r] = ok ? p.lse[lse0 + row] : INFINITY;
    delta_r[r] = ok ? delta[delta0 + row] : 0.f;
  }
}

// ------------------------------------------------------------------------------------------- dQ
// Warps W (query block 16·W), key tile BN. Shared memory (2·16W + 4·BN)·(D + 8)·2 bytes:
// D=32: 30 KB, 64: 54 KB, 96: 78 KB, 128: 102 KB, 256: 132 KB; with the soft cap 64·W·BN more (dcap_smem_bytes):
// 16 KB (8 KB for D = 256). NARROW: the tiles of a GPU whose blocks may opt in to less (sm_86 / sm_89, 99 KB):
// D = 128 takes keys 32 at a time there (68 KB; 76 KB with the soft cap).
template <int D, bool NARROW = false> struct DqCfg { static constexpr int kWarps = 4, kBlockN = 64; };
template <> struct DqCfg<256, false> { static constexpr int kWarps = 4, kBlockN = 32; };
template <> struct DqCfg<256, true> : DqCfg<256, false> {};
template <> struct DqCfg<128, true> { static constexpr int kWarps = 4, kBlockN = 32; };

template <typename T, int D, int NW, int BN>
constexpr size_t dq_smem_bytes(bool softcap) {
  return static_cast<size_t>(2 * 16 * NW + 4 * BN) * (D + 8) * sizeof(T) + dcap_smem_bytes<NW, BN>(softcap);
}

template <typename T, int D, int NW, int BN, bool BIAS_MASK, bool DROPOUT, bool MODS>
__global__ void __launch_bounds__(NW * 32) dq_kernel(const AttnParams p) {
  constexpr int BM = 16 * NW, NTH = NW * 32, P = D + 8;
  constexpr int NTS = BN / 8;  // n-tiles of a warp's 16 x BN tile of S / dP
  constexpr int NTD = D / 8;   // n-tiles of a warp's 16 x D tile of dQ
  FASTATTN_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][P]
  T* sdO = sQ + BM * P;                // [BM][P]
  T* sK = sdO + BM * P;                // [2][BN][P]
  T* sV = sK + 2 * BN * P;             // [2][BN][P]
  float* sDcap = reinterpret_cast<float*>(sV + 2 * BN * P);  // [W][NTS·4][32] with the soft cap (see apply)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const Seq seq(p, b);
  if (m0 >= seq.q_len) return;  // past the end of a packed sequence: these rows belong to the next one
  const Scores<T> sc(p, b, h, seq);
  KeyTiles<T, BM, BN, D, NTH> keys(p, b, h, m0, seq, sc.win);  // the forward's key range
  if constexpr (BIAS_MASK) keys.use_mask_ranges(p, h, m0, p.H, p.Lq);
  const int n_first = keys.first, nblocks = keys.count;
  const DropoutMask drop(p, b, h);

  load_tile_async<T, BM, D, NTH>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.q0 * p.q_sl, p.q_sl,
                                 m0, seq.q_len, tid);
  load_tile_async<T, BM, D, NTH>(sdO, static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.q0 * p.do_sl,
                                 p.do_sl, m0, seq.q_len, tid);
  if (nblocks > 0) keys.load(p, sK, sV, n_first, tid);
  cp_async_commit();

  float lse_r[2], delta_r[2];
  row_stats(p, seq, b, h, m0 + warp * 16, lane, lse_r, delta_r);
  // A full-size bias gradient is written here; a broadcast one by dbias_kernel.
  float* ds_out = p.ds != nullptr && p.ds_reduce == 0 ? p.ds + b * p.ds_sb + h * p.ds_sh : nullptr;

  float dq[NTD][4];
  zero(dq);
  for (int it = 0; it < nblocks; ++it) {
    const int st = it & 1;
    const int n0 = (n_first + it) * BN;  // first key of this tile
    if (it + 1 < nblocks) keys.load(p, sK + (st ^ 1) * BN * P, sV + (st ^ 1) * BN * P, n_first + it + 1, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // ds (the bias gradient), then ds·dcap for dQ.
    const bool capped = MODS && p.softcap > 0.f;
    float* dcap = capped ? sDcap + warp * NTS * 4 * 32 : nullptr;
    float dp[NTS][4];
    const T* sKs = sK + st * BN * P;
    score_grad<T, NTS, D, BIAS_MASK, DROPOUT, MODS>(dp, sc, drop, sQ, sdO, sKs, sV + st * BN * P, warp, m0, n0,
                                                     lse_r, delta_r, dcap, lane);
    if (ds_out != nullptr) {
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + warp * 16 + (lane >> 2) + 8 * (e >> 1);
          const int col = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
          if (row < seq.q_len && col < seq.k_len) ds_out[row * p.ds_sm + col] = dp[nt][e];
        }
    }
    if (capped) {
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] *= dcap[(nt * 4 + e) * 32 + lane];
    }

    uint32_t a[NTS / 2][4];
    c_to_a<T, NTS>(a, dp);
    gemm_rs<T, NTD, BN>(dq, a, sKs, P, 0, lane);
    __syncthreads();
  }
  cp_async_wait<0>();

  const Seq::Rows rows = Seq::reread<false>(p, b);  // seq.q0, seq.q_len
  store_c<T, NTD>(static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + rows.start * p.dq_sl, p.dq_sl, m0 + warp * 16,
                  0, rows.len, dq, p.scale, p.scale, lane);
}


// ------------------------------------------------------------------------------------------- dbias
// The gradient of a bias broadcast over some of (batch, head, query, key) (p.ds_reduce, as Triton's
// _bwd_dbias_kernel): one CTA per tile of dbias, 16·W query rows x BN keys (a summed query / key dim is one
// tile), visiting in a fixed order the (batch, head, query tile, key tile) steps it sums, among those the dQ
// kernel visits, and forming ds as that kernel does. The sum runs elementwise in registers and is reduced over
// the tile's summed rows / columns at the end (shuffles, then across warps through shared memory, in a fixed
// order): no [B, H, Lq, Lk] buffer, no atomics, the same bits on every run. One pipeline stage (a step's loads
// are waited for before its GEMMs): this kernel runs only for the gradient of a broadcast bias.
template <typename T, int D, int NW, int BN>
constexpr size_t dbias_smem_bytes() {
  return static_cast<size_t>(2 * 16 * NW + 2 * BN) * (D + 8) * sizeof(T);
}

// Bias/mask and score mods are always compiled in (each tested at run time: a null pointer, softcap 0 and slope 0
// change nothing): a quarter of the instances, for a kernel that runs only for this gradient.
template <typename T, int D, int NW, int BN, bool DROPOUT>
__global__ void __launch_bounds__(NW * 32) dbias_kernel(const AttnParams p) {
  constexpr int BM = 16 * NW, NTH = NW * 32, P = D + 8;
  constexpr int NTS = BN / 8;  // n-tiles of a warp's 16 x BN tile of ds
  FASTATTN_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [BM][P]
  T* sdO = sQ + BM * P;                // [BM][P]
  T* sK = sdO + BM * P;                // [BN][P]
  T* sV = sK + BN * P;                 // [BN][P]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool all_b = p.ds_reduce & kReduceBatch, all_h = p.ds_reduce & kReduceHead;
  const bool all_m = p.ds_reduce & kReduceQuery, all_n = p.ds_reduce & kReduceKey;
  const int m_tiles = all_m ? 1 : (p.Lq + BM - 1) / BM, heads = all_h ? 1 : p.H;
  const int slot = blockIdx.x / m_tiles;  // this tile's (batch, head) in dbias: b·heads + h
  const int b_out = slot / heads, h_out = slot % heads;
  const int m_out = (blockIdx.x % m_tiles) * BM, n_tile = blockIdx.y;  // its first query row, its key tile
  const int b_end = all_b ? p.B : b_out + 1, h_end = all_h ? p.H : h_out + 1;

  float acc[NTS][4];
  zero(acc);
  for (int b = all_b ? 0 : b_out; b < b_end; ++b) {
    const Seq seq(p, b);
    const int m_end = all_m ? seq.q_len : min(m_out + 1, seq.q_len);
    for (int h = all_h ? 0 : h_out; h < h_end; ++h) {
      const Scores<T> sc(p, b, h, seq);
      const DropoutMask drop(p, b, h);
      for (int m0 = m_out; m0 < m_end; m0 += BM) {
        // The forward's key tiles of these rows; of them, this tile's key tile only unless keys are summed.
        const KeyTiles<T, BM, BN, D, NTH> keys(p, b, h, m0, seq, sc.win);
        int n_first = keys.first, n_count = keys.count;
        if (!all_n) {
          n_count = n_tile >= keys.first && n_tile < keys.first + keys.count ? 1 : 0;
          n_first = n_tile;
        }
        if (n_count == 0) continue;
        load_tile_async<T, BM, D, NTH>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + seq.q0 * p.q_sl,
                                       p.q_sl, m0, seq.q_len, tid);
        load_tile_async<T, BM, D, NTH>(
            sdO, static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + seq.q0 * p.do_sl, p.do_sl, m0,
            seq.q_len, tid);
        float lse_r[2], delta_r[2];
        row_stats(p, seq, b, h, m0 + warp * 16, lane, lse_r, delta_r);
        for (int it = 0; it < n_count; ++it) {
          keys.load(p, sK, sV, n_first + it, tid);
          cp_async_commit();
          cp_async_wait<0>();
          __syncthreads();  // Q, dO, K, V of this step are visible
          float ds[NTS][4];
          score_grad<T, NTS, D, true, DROPOUT, true>(ds, sc, drop, sQ, sdO, sK, sV, warp, m0, (n_first + it) * BN,
                                                     lse_r, delta_r, nullptr, lane);
#pragma unroll
          for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] += ds[nt][e];
          __syncthreads();  // every warp is done with the tiles before they are refilled
        }
      }
    }
  }

  // Element (nt, e) of acc is query row m_out + 16·warp + g + 8·(e / 2), key n_tile·BN + 8·nt + 2t + e % 2.
  float* out = p.ds + b_out * p.ds_sb + h_out * p.ds_sh;
  const int g = lane >> 2, t = lane & 3, n_out = n_tile * BN;
  if (!all_m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m_out + warp * 16 + g + 8 * r;
      if (all_n) {  // summed over keys: the row's sum over the thread's columns, then over its quad
        float v = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTS; ++nt) v += acc[nt][2 * r] + acc[nt][2 * r + 1];
        v = quad_sum(v);
        if (t == 0 && row < p.Lq) out[row * p.ds_sm] = v;
        continue;
      }
#pragma unroll
      for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = n_out + nt * 8 + 2 * t + j;
          if (row < p.Lq && col < p.Lk) out[row * p.ds_sm + col] = acc[nt][2 * r + j];
        }
    }
    return;
  }
  // Summed over queries: each column over the thread's two rows, the warp's 8 row groups (lanes of one t), then
  // the warps in order; summed over keys too, then the columns in order.
  float* sCol = reinterpret_cast<float*>(smem);  // [W][BN], over Q (no longer read after the last barrier)
#pragma unroll
  for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float v = acc[nt][j] + acc[nt][j + 2];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (g == 0) sCol[warp * BN + nt * 8 + 2 * t + j] = v;
    }
  __syncthreads();
  if (all_n) {
    if (tid != 0) return;
    float v = 0.f;
    for (int col = 0; col < BN; ++col)
      for (int w = 0; w < NW; ++w) v += sCol[w * BN + col];
    out[0] = v;
    return;
  }
  for (int col = tid; col < BN; col += NTH) {
    float v = 0.f;
    for (int w = 0; w < NW; ++w) v += sCol[w * BN + col];
    if (n_out + col < p.Lk) out[n_out + col] = v;
  }
}

}  // namespace

// The dQ kernel with W warps and key tiles of BN (DqCfg).
template <typename T, int D, int NW, int BN>
const char* run_dq(const AttnParams& p, cudaStream_t s) {
  constexpr int BM = 16 * NW;
  static_assert(BM == kBwdBlock, "attention_bwd_workspace_bytes sizes key_ranges for query blocks of kBwdBlock");
  const dim3 grid((p.Lq + BM - 1) / BM, p.H, p.B);
  if (const char* err = launch_mask_ranges<BM, BN, true>(p, p.key_ranges, s)) return err;
  const auto kernel = pick_kernel(p.bias != nullptr || p.mask != nullptr, p.dropout_p > 0.f, score_mods(p),
                                  [](auto bm, auto dr, auto mo) {
                                    return dq_kernel<T, D, NW, BN, decltype(bm)::value, decltype(dr)::value,
                                                     decltype(mo)::value>;
                                  });
  return launch("dq_kernel", kernel, grid, NW * 32, dq_smem_bytes<T, D, NW, BN>(p.softcap > 0.f), s, p);
}

template <typename T, int D>
const char* run_bwd(const AttnParams& p, cudaStream_t s) {
  const bool bias_mask = p.bias != nullptr || p.mask != nullptr, dropout = p.dropout_p > 0.f, mods = score_mods(p);
  if (p.Lq > 0) {
    const dim3 grid((p.Lq + 16 * kDeltaWarps - 1) / (16 * kDeltaWarps), p.H, p.B);
    if (const char* err = launch("delta_kernel", delta_kernel<T, D>, grid, kDeltaWarps * 32, delta_smem_bytes<T, D>(),
                                 s, p, static_cast<float*>(p.workspace)))
      return err;
  }
  if (p.Lk > 0) {  // dK, dV (zeros when Lq == 0)
    using C = DkdvCfg<D>;
    constexpr int BN = 16 * C::kWarps;
    const dim3 grid((p.Lk + BN - 1) / BN, p.Hkv, p.B);
    const size_t smem = dkdv_smem_bytes<T, D, C::kWarps, C::kBlockM>(p.softcap > 0.f);
    static_assert(BN == kBwdBlock, "attention_bwd_workspace_bytes sizes query_ranges for key blocks of kBwdBlock");
    if (const char* err = launch_mask_ranges<C::kBlockM, BN, false>(p, p.query_ranges, s)) return err;
    const auto kernel = pick_kernel(bias_mask, dropout, mods, [](auto bm, auto dr, auto mo) {
      return dkdv_kernel<T, D, C::kWarps, C::kBlockM, C::kSplit, decltype(bm)::value, decltype(dr)::value,
                         decltype(mo)::value>;
    });
    if (const char* err = launch("dkdv_kernel", kernel, grid, C::kWarps * 32, smem, s, p)) return err;
  }
  if (p.Lq > 0) {  // dQ (zeros when Lk == 0)
    using W = DqCfg<D>;
    using N = DqCfg<D, true>;
    bool narrow = false;
    if (const char* err = narrow_tiles<W::kWarps != N::kWarps || W::kBlockN != N::kBlockN>(
            dq_smem_bytes<T, D, W::kWarps, W::kBlockN>(p.softcap > 0.f), narrow))
      return err;
    if (const char* err =
            narrow ? run_dq<T, D, N::kWarps, N::kBlockN>(p, s) : run_dq<T, D, W::kWarps, W::kBlockN>(p, s))
      return err;
  }
  if (p.ds != nullptr && p.ds_reduce != 0 && p.Lq > 0 && p.Lk > 0) {  // dbias of a broadcast bias
    using C = DqCfg<D>;
    constexpr int BM = 16 * C::kWarps, BN = C::kBlockN;
    const int64_t m_tiles = p.ds_reduce & kReduceQuery ? 1 : (p.Lq + BM - 1) / BM;
    const int64_t slots = (p.ds_reduce & kReduceBatch ? 1 : p.B) * (p.ds_reduce & kReduceHead ? 1 : p.H);
    const int64_t n_tiles = p.ds_reduce & kReduceKey ? 1 : (p.Lk + BN - 1) / BN;
    if (m_tiles * slots > 0x7fffffff || n_tiles > 65535)
      return "fastattn CUDA attention: the broadcast bias gradient has too many tiles for one launch";
    const dim3 grid(static_cast<unsigned>(m_tiles * slots), static_cast<unsigned>(n_tiles));
    const auto kernel = dropout ? dbias_kernel<T, D, C::kWarps, BN, true> : dbias_kernel<T, D, C::kWarps, BN, false>;
    const size_t smem = dbias_smem_bytes<T, D, C::kWarps, BN>();
    if (const char* err = launch("dbias_kernel", kernel, grid, C::kWarps * 32, smem, s, p)) return err;
  }
  return nullptr;
}

}  // namespace attn
}  // namespace fastattn
