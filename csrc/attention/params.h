// Plain parameters of the fused attention kernels, shared by forward and backward. No torch, no CUDA headers:
// the Python side (fastattn/cuda/attention.py) fills it from tensors through the pybind11 class in bindings.cpp.
//
// Layout (B, H, L, D) for q/o/dq/do, (B, Hkv, L, D) for k/v/dk/dv; strides are in elements and the last dim is
// contiguous. Query head h reads kv head h / (H / Hkv) (GQA). Scores s_ij = scale·q_i·k_j + bias_ij over the
// visible keys j of row i (causal, kv_lens, mask); lse is kept in base 2: lse2_i = log2 Σ_j exp2(s_ij·log2 e),
// +inf for a row with no visible key, whose output is 0 (and whose gradients are 0).
//
// Local attention (semantics of fastattn/triton/attention.py: _key_range, _query_range, _visible, _scores): the
// diagonal of query row i is d(i) = i + shift, shift = kv_len − q_len when bottom_right (per sequence), else 0.
// Key j is visible iff d(i) − window_left <= j <= d(i) + window_right (−1 = unbounded on that side; causal sets
// window_right = 0), besides kv_lens and the mask. With softcap c > 0 the scaled dot product x = scale·q_i·k_j
// becomes c·tanh(x / c) before the bias; alibi adds −slope_{b,h}·|d(i) − j|. Key (query) blocks outside every
// row's (key's) window are not visited.
//
// Packed variable-length batch (cu_seqlens_q set): q/o/dq/do are [total_q, H, D] and k/v/dk/dv [total_k, Hkv, D]
// (batch strides 0, row strides the packed tensors' first stride); sequence b holds rows cu_seqlens_q[b] ..
// cu_seqlens_q[b+1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b+1] of k; Lq, Lk are max_seqlen_q/k (the grid)
// and every index i, j below (causal diagonal, dropout counter, bias/mask/ds) is local to the sequence;
// lse / dlse are [H, total_q]. Semantics: fastattn/triton/attention.py (VARLEN).
#pragma once
#include <cstdint>

namespace fastattn {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };
enum DsReduce : int { kReduceBatch = 1, kReduceHead = 2, kReduceQuery = 4, kReduceKey = 8 };

struct AttnParams {
  int dtype = kFloat16;                 // element type of q, k, v, o, bias, do, dq, dk, dv
  int B = 0, H = 0, Hkv = 0, Lq = 0, Lk = 0;
  int D = 0;                            // head dim: 32, 64, 96, 128 or 256 (the Python side pads others)
  float scale = 1.f;
  bool causal = false;                  // key j <= d(i): window_right = 0
  bool bottom_right = false;            // diagonal d(i) = i + kv_len − Lq instead of i (per sequence)
  int window_left = -1, window_right = -1;  // local attention (see above); −1 = unbounded
  float softcap = 0.f;                  // c > 0: scores c·tanh(scale·q·k / c); 0 = off
  const float* alibi = nullptr;         // fp32 slopes, slope of (b, h) at alibi[b·alibi_sb + h]; null = off
  int64_t alibi_sb = 0;                 // 0 for slopes [H] shared by the batch

  // Forward inputs / outputs.
  const void* q = nullptr; int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  const void* k = nullptr; int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  const void* v = nullptr; int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  void* o = nullptr;       int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  float* lse = nullptr;                 // [B, H, Lq] contiguous ([H, total_q] packed), base 2 (see above)
  // Optional, with o's strides: the forward also stores what rounding o to T dropped (fp32 o − o rounded, rounded),
  // and the backward adds do_i·o_lo_i to D_i = do_i·o_i (an exact D: see the delta kernel). null = off.
  void* o_lo = nullptr;

  // Packed batch (see above): int32 [B + 1] cumulative lengths, both set or both null; total rows of q and k.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;

  // Optional: additive bias (dtype), bool mask (uint8, nonzero = attend), per-batch key lengths (right padding).
  // Broadcast dims of bias / mask have stride 0.
  const void* bias = nullptr;   int64_t bias_sb = 0, bias_sh = 0, bias_sm = 0, bias_sn = 0;
  const uint8_t* mask = nullptr; int64_t mask_sb = 0, mask_sh = 0, mask_sm = 0, mask_sn = 0;
  const int32_t* kv_lens = nullptr;     // [B]; keys j >= min(kv_lens[b], Lk or the sequence's keys) are invisible

  // Dropout: weight (b, h, i, j) is kept iff philox_uniform(seed, ((b·H + h)·Lq + i)·Lk + j) >= dropout_p
  // (philox.h: the Triton kernels' rule, bit for bit), and kept weights are scaled by 1 / (1 − dropout_p).
  float dropout_p = 0.f;                // in [0, 1); 0 = off
  uint64_t seed = 0;

  // Backward.
  const void* dout = nullptr; int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  const float* dlse = nullptr;          // optional gradient of lse (base 2), laid out as lse
  void* dq = nullptr; int64_t dq_sb = 0, dq_sh = 0, dq_sl = 0;
  void* dk = nullptr; int64_t dk_sb = 0, dk_sh = 0, dk_sl = 0;
  void* dv = nullptr; int64_t dv_sb = 0, dv_sh = 0, dv_sl = 0;
  // Optional bias gradient, fp32, zero-filled by the caller: ds_ij = p_ij (dp_ij − D_i) where visible, summed
  // over the dims named by ds_reduce (those a bias is broadcast over); element (b, h, i, j) at
  // b·ds_sb + h·ds_sh + i·ds_sm + j, with the index of a summed dim 0 ([B|1, H|1, Lq|1, Lk|1], last dim dense).
  float* ds = nullptr; int64_t ds_sb = 0, ds_sh = 0, ds_sm = 0;
  int ds_reduce = 0;                    // bits of kReduceBatch, kReduceHead, kReduceQuery, kReduceKey
  void* workspace = nullptr;            // attention_{fwd,bwd}_workspace_bytes(p) bytes, allocated by the caller
                                        // (backward: D_i of every (b, h, i < Lq), dense [B, H, Lq] fp32;
                                        // split forward: the splits' partial outputs and lse, see num_splits;
                                        // with a bool mask: the tile ranges below)

  // Split-KV forward (FlashDecoding): each CTA's key tiles are cut into num_splits runs of whole tiles, one CTA
  // each. Run s writes its normalised output o_s (fp32 [S, B, H, Lq, D]) and lse2_s (fp32 [S, B, H, Lq], −inf
  // where it saw no visible key) to the workspace, rows indexed within their sequence (Lq = max_seqlen_q when
  // packed); a second kernel merges them: lse2 = log2 Σ_s 2^lse2_s, o = Σ_s 2^(lse2_s − lse2) o_s. 1 = unsplit.
  int num_splits = 1;

  // Packed GQA forward (FlashAttention-3's pack_gqa; the backward refuses it): G = pack_gqa = H / Hkv > 1 runs the
  // G query heads of a kv head as the rows of one CTA, row r of kv head hk being query r / G of head hk·G + r % G,
  // so that K/V are read once per group; the grid covers Lq·G rows of Hkv heads. The rows of a CTA must differ by
  // position and head only: no ALiBi or dropout, and a bias / mask broadcast over heads (stride 0). 1 = off.
  int pack_gqa = 1;

  // Set by the entry points (in the workspace), not by the caller: with a bool mask, the tiles each CTA visits once
  // those the mask hides at either end of its range are trimmed (mask_ranges_kernel), as (first tile, count) pairs
  // for each query block of the forward and dQ kernels (key_ranges, [B, H, query blocks]) and each key block of
  // the dK/dV kernel (query_ranges, [B, Hkv, key blocks]).
  int32_t* key_ranges = nullptr;
  int32_t* query_ranges = nullptr;
  // Set by the entry points too: r / pack_gqa = (r · pack_mul) >> pack_shift for every row r < 2^30 (a division
  // the kernels' main loops can afford: ptxas spilled the 128-register forward with a division instruction).
  uint32_t pack_mul = 1u << 31;
  int pack_shift = 31;
};

}  // namespace fastattn
