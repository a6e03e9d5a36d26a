// pybind11 module fastattn._C: the CUDA kernels behind plain integers. Tensors arrive as data pointers
// (Python ints), sizes and strides in elements, streams as the integer value of a cudaStream_t. No torch and
// no CUDA headers here, so the extension builds against any torch. Every entry point returns an error string
// from C++ (nullptr on success); a non-null one is raised as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "layer_norm.h"
#include "softmax.h"

#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif
#ifndef FASTATTN_MODULE  // _C_emu for the CPU emulator build (csrc/emulate/)
#define FASTATTN_MODULE _C
#endif
#ifndef FASTATTN_VERSION
#define FASTATTN_VERSION "0+unknown"
#endif

namespace py = pybind11;
using fastattn::AttnParams;

#if defined(FASTATTN_EMULATE)
bool fastattn_emu_set_schedule(const std::string& order, const std::string& copies,
                               uint64_t seed);  // csrc/emulate/runtime.cpp
uint64_t fastattn_emu_mma_count(bool reset);   // csrc/emulate/runtime.cpp
#endif

static_assert(int(fastattn::kFloat16) == int(fastattn::kRowFloat16) &&
                  int(fastattn::kBFloat16) == int(fastattn::kRowBFloat16),
              "attention and row-kernel dtype codes agree");

namespace {

void raise_if(const char* err) {
  if (err) throw std::runtime_error(err);
}

template <typename T>
T* ptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

void* stream_ptr(std::uintptr_t s) { return reinterpret_cast<void*>(s); }

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::stringstream ss(FASTATTN_CUDA_ARCHS);
  std::string a;
  while (std::getline(ss, a, ';'))
    if (!a.empty()) out.push_back(a);
  return out;
}

// A read-write property for a pointer field, seen from Python as an int (0 = null).
template <typename T>
void pointer_field(py::class_<AttnParams>& cls, const char* name, T* AttnParams::*field) {
  cls.def_property(
      name, [field](const AttnParams& p) { return reinterpret_cast<std::uintptr_t>(p.*field); },
      [field](AttnParams& p, std::uintptr_t v) { p.*field = reinterpret_cast<T*>(v); });
}

}  // namespace

PYBIND11_MODULE(FASTATTN_MODULE, m) {
  m.doc() = "fastattn CUDA C++ kernels (attention, softmax, LayerNorm) taking data pointers, sizes, strides "
            "and a stream as integers";
  m.attr("version") = FASTATTN_VERSION;
  m.attr("__version__") = FASTATTN_VERSION;
  m.attr("FLOAT16") = int(fastattn::kRowFloat16);
  m.attr("BFLOAT16") = int(fastattn::kRowBFloat16);
  m.attr("FLOAT32") = int(fastattn::kRowFloat32);
  // AttnParams::ds_reduce bits, in the order of the dims (batch, head, query, key)
  m.attr("DS_REDUCE") = py::make_tuple(int(fastattn::kReduceBatch), int(fastattn::kReduceHead),
                                       int(fastattn::kReduceQuery), int(fastattn::kReduceKey));
#if defined(FASTATTN_EMULATE)
  m.attr("emulated") = true;
  m.def(
      "set_schedule",
      [](const std::string& order, const std::string& cp_async, uint64_t seed) {
        if (cp_async != "eager" && cp_async != "lazy")
          throw py::value_error("cp_async: 'eager' or 'lazy', got '" + cp_async + "'");
        if (!fastattn_emu_set_schedule(order, cp_async, seed))
          throw py::value_error("order: 'forward', 'reverse', 'shuffle', 'first-ahead' or 'last-ahead', got '" +
                                order + "'");
      },
      "How the emulator orders a block's threads between barriers and when cp.async lands (csrc/emulate/)",
      py::arg("order") = "forward", py::arg("cp_async") = "eager", py::arg("seed") = 0);
  m.def("mma_count", &fastattn_emu_mma_count,
        "Warp-level mma.m16n8k16 executed since the last reset (the tiles the kernels computed)",
        py::arg("reset") = false);
#else
  m.attr("emulated") = false;
#endif
  m.def("compiled_archs", &compiled_archs, "The CUDA architectures (FASTATTN_CUDA_ARCHS) this build holds code for");

  // ---------------------------------------------------------------------------------------------- attention
  // module_local: fastattn._C and the emulator build fastattn._C_emu both bind it, in one process.
  py::class_<AttnParams> cls(m, "AttnParams", py::module_local(),
                             "fastattn::AttnParams (csrc/attention/params.h); pointers as ints");
  cls.def(py::init<>());
#define FA_FIELD(name) cls.def_readwrite(#name, &AttnParams::name)
  FA_FIELD(dtype); FA_FIELD(B); FA_FIELD(H); FA_FIELD(Hkv); FA_FIELD(Lq); FA_FIELD(Lk); FA_FIELD(D);
  FA_FIELD(scale); FA_FIELD(causal); FA_FIELD(bottom_right);
  FA_FIELD(window_left); FA_FIELD(window_right); FA_FIELD(softcap); FA_FIELD(alibi_sb);
  FA_FIELD(q_sb); FA_FIELD(q_sh); FA_FIELD(q_sl);
  FA_FIELD(k_sb); FA_FIELD(k_sh); FA_FIELD(k_sl);
  FA_FIELD(v_sb); FA_FIELD(v_sh); FA_FIELD(v_sl);
  FA_FIELD(o_sb); FA_FIELD(o_sh); FA_FIELD(o_sl);
  FA_FIELD(bias_sb); FA_FIELD(bias_sh); FA_FIELD(bias_sm); FA_FIELD(bias_sn);
  FA_FIELD(mask_sb); FA_FIELD(mask_sh); FA_FIELD(mask_sm); FA_FIELD(mask_sn);
  FA_FIELD(dropout_p); FA_FIELD(seed);
  FA_FIELD(total_q); FA_FIELD(total_k);
  FA_FIELD(do_sb); FA_FIELD(do_sh); FA_FIELD(do_sl);
  FA_FIELD(dq_sb); FA_FIELD(dq_sh); FA_FIELD(dq_sl);
  FA_FIELD(dk_sb); FA_FIELD(dk_sh); FA_FIELD(dk_sl);
  FA_FIELD(dv_sb); FA_FIELD(dv_sh); FA_FIELD(dv_sl);
  FA_FIELD(ds_sb); FA_FIELD(ds_sh); FA_FIELD(ds_sm); FA_FIELD(ds_reduce); FA_FIELD(num_splits);
  FA_FIELD(pack_gqa);
#undef FA_FIELD
  pointer_field(cls, "q", &AttnParams::q);
  pointer_field(cls, "k", &AttnParams::k);
  pointer_field(cls, "v", &AttnParams::v);
  pointer_field(cls, "o", &AttnParams::o);
  pointer_field(cls, "o_lo", &AttnParams::o_lo);
  pointer_field(cls, "lse", &AttnParams::lse);
  pointer_field(cls, "bias", &AttnParams::bias);
  pointer_field(cls, "mask", &AttnParams::mask);
  pointer_field(cls, "kv_lens", &AttnParams::kv_lens);
  pointer_field(cls, "alibi", &AttnParams::alibi);
  pointer_field(cls, "cu_seqlens_q", &AttnParams::cu_seqlens_q);
  pointer_field(cls, "cu_seqlens_k", &AttnParams::cu_seqlens_k);
  pointer_field(cls, "dout", &AttnParams::dout);
  pointer_field(cls, "dlse", &AttnParams::dlse);
  pointer_field(cls, "dq", &AttnParams::dq);
  pointer_field(cls, "dk", &AttnParams::dk);
  pointer_field(cls, "dv", &AttnParams::dv);
  pointer_field(cls, "ds", &AttnParams::ds);
  pointer_field(cls, "workspace", &AttnParams::workspace);

  m.def("attention_supports_head_dim", &fastattn::attention_supports_head_dim, py::arg("d"));
  m.def("attention_bwd_workspace_bytes", &fastattn::attention_bwd_workspace_bytes, py::arg("params"));
  m.def("attention_fwd_workspace_bytes", &fastattn::attention_fwd_workspace_bytes, py::arg("params"));
  m.def(
      "attention_fwd_tile",
      [](int d) {
        int bm = 0, bn = 0;
        if (!fastattn::attention_supports_head_dim(d))
          throw std::invalid_argument("fastattn CUDA attention: head dim must be 32, 64, 96, 128 or 256");
        raise_if(fastattn::attention_fwd_tile(d, bm, bn));
        return py::make_tuple(bm, bn);
      },
      py::arg("d"), "(query rows, keys) of the forward's tile for head dim d on the current GPU (split-KV heuristic)");
  m.def(
      "attention_fwd",
      [](const AttnParams& p, std::uintptr_t stream) { raise_if(fastattn::attention_fwd(p, stream_ptr(stream))); },
      py::arg("params"), py::arg("stream"));
  m.def(
      "attention_bwd",
      [](const AttnParams& p, std::uintptr_t stream) { raise_if(fastattn::attention_bwd(p, stream_ptr(stream))); },
      py::arg("params"), py::arg("stream"));
  m.def(
      "attention_dropout_mask",
      [](std::uintptr_t keep, int64_t n, float dropout_p, uint64_t seed, std::uintptr_t stream) {
        raise_if(fastattn::attention_dropout_mask(ptr<uint8_t>(keep), n, dropout_p, seed, stream_ptr(stream)));
      },
      py::arg("keep"), py::arg("n"), py::arg("dropout_p"), py::arg("seed"), py::arg("stream"),
      "dropout's keep-mask [B, H, Lq, Lk] (n bytes, 1 = kept) for (dropout_p, seed), as the kernels apply it");

  // ---------------------------------------------------------------------------------------------- softmax
  m.def(
      "softmax_fwd",
      [](std::uintptr_t x, std::uintptr_t y, std::uintptr_t mask, int64_t rows, int64_t cols, int x_dtype,
         int y_dtype, int mask_dtype, int64_t lead1, int64_t lead2, int64_t mask_s0, int64_t mask_s1,
         int64_t mask_s2, float scale, std::uintptr_t stream) {
        fastattn::SoftmaxFwdParams p;
        p.x = ptr<const void>(x); p.y = ptr<void>(y); p.mask = ptr<const void>(mask);
        p.rows = rows; p.cols = cols; p.x_dtype = x_dtype; p.y_dtype = y_dtype; p.mask_dtype = mask_dtype;
        p.lead1 = lead1; p.lead2 = lead2; p.mask_s0 = mask_s0; p.mask_s1 = mask_s1; p.mask_s2 = mask_s2;
        p.scale = scale;
        raise_if(fastattn::softmax_fwd(p, stream_ptr(stream)));
      },
      py::arg("x"), py::arg("y"), py::arg("mask"), py::arg("rows"), py::arg("cols"), py::arg("x_dtype"),
      py::arg("y_dtype"), py::arg("mask_dtype"), py::arg("lead1"), py::arg("lead2"), py::arg("mask_s0"),
      py::arg("mask_s1"), py::arg("mask_s2"), py::arg("scale"), py::arg("stream"),
      "softmax(x·scale + mask) of [rows, cols] rows (see csrc/softmax.h); pointers as ints, 0 = none");
  m.def(
      "softmax_bwd",
      [](std::uintptr_t y, std::uintptr_t dy, std::uintptr_t dx, std::uintptr_t dz, int64_t rows, int64_t cols,
         int y_dtype, int dx_dtype, float scale, std::uintptr_t stream) {
        fastattn::SoftmaxBwdParams p;
        p.y = ptr<const void>(y); p.dy = ptr<const void>(dy); p.dx = ptr<void>(dx); p.dz = ptr<float>(dz);
        p.rows = rows; p.cols = cols; p.y_dtype = y_dtype; p.dx_dtype = dx_dtype; p.scale = scale;
        raise_if(fastattn::softmax_bwd(p, stream_ptr(stream)));
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("dz"), py::arg("rows"), py::arg("cols"),
      py::arg("y_dtype"), py::arg("dx_dtype"), py::arg("scale"), py::arg("stream"),
      "dx = scale·y⊙(dy − Σ y·dy), and dz = dx/scale into fp32 dz when dz != 0 (see csrc/softmax.h)");

  // ---------------------------------------------------------------------------------------------- layer_norm
  m.def(
      "layer_norm_fwd",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
         std::uintptr_t s, std::uintptr_t mean, std::uintptr_t rstd, int64_t rows, int64_t cols, int dtype,
         int w_dtype, int b_dtype, float eps, std::uintptr_t stream) {
        fastattn::LayerNormFwdParams p;
        p.x = ptr<const void>(x); p.residual = ptr<const void>(residual); p.w = ptr<const void>(w);
        p.b = ptr<const void>(b); p.y = ptr<void>(y); p.s = ptr<void>(s); p.mean = ptr<float>(mean);
        p.rstd = ptr<float>(rstd); p.rows = rows; p.cols = cols; p.dtype = dtype; p.w_dtype = w_dtype;
        p.b_dtype = b_dtype; p.eps = eps;
        raise_if(fastattn::layer_norm_fwd(p, stream_ptr(stream)));
      },
      py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("s"), py::arg("mean"),
      py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("w_dtype"), py::arg("b_dtype"),
      py::arg("eps"), py::arg("stream"), "LayerNorm of [rows, cols] rows (see csrc/layer_norm.h)");
  m.def(
      "layer_norm_bwd",
      [](std::uintptr_t s, std::uintptr_t w, std::uintptr_t dy, std::uintptr_t dsum, std::uintptr_t dx,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dw_partial, std::uintptr_t db_partial,
         int64_t rows, int64_t cols, int dtype, int w_dtype, int partials, std::uintptr_t stream) {
        fastattn::LayerNormBwdParams p;
        p.s = ptr<const void>(s); p.w = ptr<const void>(w); p.dy = ptr<const void>(dy);
        p.dsum = ptr<const void>(dsum); p.dx = ptr<void>(dx); p.mean = ptr<const float>(mean);
        p.rstd = ptr<const float>(rstd); p.dw_partial = ptr<float>(dw_partial); p.db_partial = ptr<float>(db_partial);
        p.rows = rows; p.cols = cols; p.dtype = dtype; p.w_dtype = w_dtype; p.partials = partials;
        raise_if(fastattn::layer_norm_bwd(p, stream_ptr(stream)));
      },
      py::arg("s"), py::arg("w"), py::arg("dy"), py::arg("dsum"), py::arg("dx"), py::arg("mean"), py::arg("rstd"),
      py::arg("dw_partial"), py::arg("db_partial"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("w_dtype"), py::arg("partials"), py::arg("stream"),
      "LayerNorm backward with per-block partial dw/db rows (see csrc/layer_norm.h)");
  m.def("layer_norm_bwd_threads", &fastattn::layer_norm_bwd_threads, py::arg("dtype"), py::arg("cols"),
        "Threads per block of layer_norm_bwd for rows of `cols` elements");
}
