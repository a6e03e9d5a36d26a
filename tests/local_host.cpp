// Host driver for csrc/attention/local.h (tests/test_cuda_local.py): the CUDA kernels' window rule, key / query
// tile ranges and soft cap, computed on the CPU. Built by the test with the host C++ compiler and, when present,
// with nvcc (as CUDA source: the functions are then __host__ __device__, as in the kernels). Reads commands from
// stdin, one per line, and answers each with one line:
//   w LQ LK CAUSAL LEFT RIGHT Q_LEN KV_LEN SHIFT BM BN
//       window (LEFT, RIGHT) of a sequence with Q_LEN queries, KV_LEN visible keys and diagonal shift SHIFT
//       (the grid's extents LQ x LK, through normalize_window) ->
//       "V" + Q_LEN·KV_LEN 0/1 (visible(i, j), row-major) + " R" + lo,hi of key_range(i) per row i < Q_LEN
//       + " K" + first,count of key_tiles per query block m0 = 0, BM, .. < Q_LEN
//       + " Q" + m_begin,count of query_tiles per key block n0 = 0, BN, .. < KV_LEN + BN
//       (the last key block may start at or past KV_LEN: a block of padding keys)
//   c X...  -> for each fp32 X (its bit pattern, an unsigned int): the fp32 bit patterns of softcap_tanh(X) and of
//              its derivative, "T,D"
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "attention/local.h"
#include "host_driver.h"

int main() {
  return serve_commands([](const std::string& cmd, std::istringstream& in) {
    if (cmd == "w") {
      fastattn::AttnParams p;
      int causal = 0, q_len = 0, kv_len = 0, shift = 0, BM = 0, BN = 0;
      in >> p.Lq >> p.Lk >> causal >> p.window_left >> p.window_right >> q_len >> kv_len >> shift >> BM >> BN;
      p.causal = causal != 0;
      fastattn::normalize_window(p);
      const fastattn::Window w(p, q_len, kv_len, shift);
      std::string out = "V";
      for (int i = 0; i < q_len; ++i)
        for (int j = 0; j < kv_len; ++j) out += w.visible(i, j) ? '1' : '0';
      out += " R";
      for (int i = 0; i < q_len; ++i) {
        int lo, hi;
        w.key_range(i, lo, hi);
        out += " " + std::to_string(lo) + "," + std::to_string(hi);
      }
      out += " K";
      for (int m0 = 0; m0 < q_len; m0 += BM) {
        int first, count;
        w.key_tiles(m0, BM, BN, first, count);
        out += " " + std::to_string(first) + "," + std::to_string(count);
      }
      out += " Q";
      for (int n0 = 0; n0 < kv_len + BN; n0 += BN) {
        int m_begin, count;
        w.query_tiles(n0, BN, BM, m_begin, count);
        out += " " + std::to_string(m_begin) + "," + std::to_string(count);
      }
      std::printf("%s\n", out.c_str());
      return true;
    }
    if (cmd == "c") {
      unsigned long xb;
      while (in >> xb) {
        const uint32_t b32 = static_cast<uint32_t>(xb);
        float x, d;
        std::memcpy(&x, &b32, sizeof x);
        const float t = fastattn::softcap_tanh(x, d);
        std::printf("%u,%u ", float_bits(t), float_bits(d));
      }
      std::printf("\n");
      return true;
    }
    return false;
  });
}
