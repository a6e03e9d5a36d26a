// Host driver for csrc/attention/philox.h (tests/test_cuda_philox.py): the CUDA kernels' dropout random numbers,
// computed on the CPU so that they can be compared bit for bit with Triton's tl.rand under the interpreter.
// Built by the test with the host C++ compiler and, when present, with nvcc (as CUDA source: the functions are
// then __host__ __device__, as in the kernels). Reads commands from stdin, one per line:
//   u SEED COUNTER...          -> the fp32 bit patterns of philox_uniform(SEED, COUNTER), one line
//   m SEED P H LQ LK B_ H_ I0 NI J0 NJ
//                              -> rows I0 .. I0 + NI − 1, columns J0 .. J0 + NJ − 1 of the attention dropout
//                                 keep-mask of (batch B_, head H_) of H heads and padded extents LQ x LK, as
//                                 one line of 0/1 (row-major), through the kernels' own DropoutMask (counters
//                                 ((B_·H + H_)·LQ + i)·LK + j)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "attention/philox.h"
#include "host_driver.h"

int main() {
  return serve_commands([](const std::string& cmd, std::istringstream& in) {
    if (cmd == "u") {
      unsigned long long seed = 0, counter = 0;
      in >> seed;
      while (in >> counter) std::printf("%u ", float_bits(fastattn::philox_uniform(seed, counter)));
      std::printf("\n");
      return true;
    }
    if (cmd == "m") {
      fastattn::AttnParams prm;
      unsigned long long seed = 0;
      std::string p_text;
      int b = 0, h = 0, i0 = 0, ni = 0, j0 = 0, nj = 0;
      in >> seed >> p_text >> prm.H >> prm.Lq >> prm.Lk >> b >> h >> i0 >> ni >> j0 >> nj;
      prm.seed = seed;
      // p arrives as a Python float (double) and becomes fp32 by rounding, as for a Triton fp32 argument and
      // for AttnParams::dropout_p set from Python.
      prm.dropout_p = static_cast<float>(std::strtod(p_text.c_str(), nullptr));
      const fastattn::DropoutMask mask(prm, b, h);
      std::string out;
      for (int i = i0; i < i0 + ni; ++i)
        for (int j = j0; j < j0 + nj; ++j) out += mask.keep(i, j) ? '1' : '0';
      std::printf("%s\n", out.c_str());
      return true;
    }
    return false;
  });
}
