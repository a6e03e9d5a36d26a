"""Compile every Triton kernel for a CUDA target without a GPU (Triton -> PTX -> ptxas cubin), per autotune config that
survives pruning, and report shared memory, registers and spills (cuobjdump's stack bytes). Kernels are specialised as
the JIT specialises a launch on contiguous inputs whose row length is a multiple of 16 (pointers and strides divisible
by 16). The attention tiles' default (first) entries, or with --all-tiles every entry of the tables in
fastattn/triton/attention.py, must compile for sm_90 without spilling (causal attention with kv_lens; the fp16
defaults at d64/d128 also with a bias gradient, a bool mask, dropout, a soft cap, split-KV or packed GQA), with
their main loops' loads pipelined (cp.async) and, for the fp16 defaults (with each of those features too), their
dots on wgmma; fp32 kernels must not use approximate divisions or square roots, nor, in attention (every feature
on too), approximate exponentials. A kernel whose TTGIR transposes a tensor in an MMA result layout fails too:
tl.dot(tl.trans(<dot result>), x) has reported miscompiles on Hopper (triton-lang/triton#6124), and our dK/dV
kernel, when written that way, failed dK on an H200. Without --all-tiles /
every config, each kernel is checked with the config an untuned launch runs: the first that fits the target's shared
memory (the full-feature d128 forward's first tile does not fit an A100's). Run by tests/test_kernels_compile.py in a
process without TRITON_INTERPRET (interpreted kernels cannot be compiled).

    python tests/aot_compile.py --arch 90 [--first-only] [--all-tiles]   (a line per compile; exit 1 on a failure)
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastattn.triton import attention as A
from fastattn.triton import layer_norm as LN
from fastattn.triton import softmax as SM

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
POINTERS = {"Bias": "*fp32", "Scale": "*fp32", "Mask": "*u8", "KvLens": "*i32", "Lse": "*fp32", "Delta": "*fp32", "DLse": "*fp32",
            "DBias": "*fp32", "Alibi": "*fp32", "Visits": "*i32", "CuQ": "*i32", "CuK": "*i32", "Keep": "*u8",
            "Mean": "*fp32", "Rstd": "*fp32", "DWp": "*fp32", "DBp": "*fp32", "DZ": "*fp32", "OutPart": "*fp32",
            "LsePart": "*fp32"}
DATA = {"Q", "K", "V", "Out", "OutLo", "DO", "DQ", "DK", "DV", "X", "Y", "DY", "DX", "Res", "W", "B", "S", "DSum"}
FLOATS = {"sm_scale", "scale", "eps", "softcap", "dropout_p", "keep_scale"}
INT64 = {"seed", "drop_base"}
# Approximate divisions and square roots (up to 2 ulp), which fp32 outputs would show: fp32 kernels use div_rn / sqrt_rn
APPROX = ("div.full.f32", "sqrt.approx")
# fp32 dots whose accumulator is not a constant 0: Triton folded a running sum into the dot (acc + tl.dot(a, b) ->
# tl.dot(a, b, acc)), which on a GPU makes the sum over all blocks one chain of fp32 FMAs (_two_sum in the kernels)
DOT_ACC = re.compile(r"= tt\.dot %[\w.]+, %[\w.]+, (%[\w.]+)")
ZERO = re.compile(r"(%[\w.]+) = arith\.constant dense<0\.000000e\+00>")


def folded_sums(ttgir):
    """The accumulators of the tt.dot ops in ttgir that are not a constant 0."""
    zeros = set(ZERO.findall(ttgir))
    return [acc for acc in DOT_ACC.findall(ttgir) if acc not in zeros]


CONTRACTIBLE = ("mul.f32 ", "add.f32 ", "sub.f32 ")


def kernel_module(kernel) -> str:
    return (kernel.fn if hasattr(kernel, "configs") else kernel).module


# tt.trans whose operand is in an MMA (dot result) layout: "tt.trans %x ... : tensor<32x128xf16, #mma> -> ..."
MMA_TRANSPOSE = re.compile(r"tt\.trans .*: tensor<[^>]*#mma\d*> ->")


def signature(fn, dtype, consts, pointers=POINTERS):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in DATA:
            sig[name] = "*" + TORCH_TO_TRITON[dtype]
        else:
            sig[name] = "fp32" if name in FLOATS else "i64" if name in INT64 else "i32"
    return sig


def compile_one(kernel, dtype, consts, config, arch, pointers=POINTERS):
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    consts = dict(consts, **(config.kwargs if config else {}))
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    opts = dict(num_warps=config.num_warps if config else 4, num_stages=config.num_stages if config else 2)
    if dtype == torch.float32 and kernel_module(kernel) == A.__name__:  # as the op launches them (no contraction)
        opts.update(A.FP32_OPTIONS)
    sig = signature(fn, dtype, consts, pointers)
    # As the JIT specialises a launch on contiguous inputs whose row length is a multiple of 16: every pointer
    # and stride divisible by 16, which is what lets loads vectorise and the loops pipeline (cp.async).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name.startswith("s_")}
    t = time.time()
    compiled = triton.compile(ASTSource(fn, sig, consts, attrs),
                              target=GPUTarget("cuda", arch, 32), options=opts)
    transposes = [line.strip() for line in compiled.asm["ttgir"].splitlines() if MMA_TRANSPOSE.search(line)]
    if transposes:
        raise RuntimeError("transpose of a dot result (miscompiled on Hopper): " + transposes[0][:300])
    return compiled, time.time() - t, resources(compiled.asm["cubin"])


def resources(cubin: bytes):
    """(registers, stack bytes) per thread of the cubin's kernel, from triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not found:
        raise RuntimeError("cuobjdump printed no resource usage:\n" + out[-500:])
    return int(found.group(1)), int(found.group(2))


def fp64_pointers(dtype):
    """The pointer types of an attention launch by the op: fp32 inputs keep lse2 in fp64 (the forward's Lse and
    split workspace, the backward's Lse) and D (Delta)."""
    if dtype != torch.float32:
        return POINTERS
    return dict(POINTERS, Lse="*fp64", Delta="*fp64", LsePart="*fp64")


def cases():
    full = dict(WIN_LEFT=True, WIN_RIGHT=True, BOTTOM_RIGHT=True, HAS_BIAS=True, HAS_MASK=True, HAS_KVLENS=True,
                BIAS_GRAD=True, HAS_DLSE=True, HAS_ALIBI=True, HAS_SOFTCAP=True, COUNT_VISITS=False, VARLEN=False,
                DROPOUT=True, SPLIT=True, PACK_GQA=True, STORE_LO=True, HAS_LO=True)
    plain = dict(WIN_LEFT=False, WIN_RIGHT=False, BOTTOM_RIGHT=False, HAS_BIAS=False, HAS_MASK=False,
                 HAS_KVLENS=False, BIAS_GRAD=False, HAS_DLSE=True, HAS_ALIBI=False, HAS_SOFTCAP=False,
                 COUNT_VISITS=False, VARLEN=False, DROPOUT=False, SPLIT=False, PACK_GQA=False, STORE_LO=False,
                 HAS_LO=False)
    yield torch.float16, 128, full, True
    yield torch.float32, 256, full, True
    yield torch.bfloat16, 64, plain, False
    yield torch.float16, 111, dict(plain, WIN_RIGHT=True, HAS_KVLENS=True, STORE_LO=True, HAS_LO=True), False
    yield torch.bfloat16, 256, dict(plain, HAS_MASK=True), True
    yield torch.float16, 64, dict(plain, VARLEN=True, DROPOUT=True, WIN_RIGHT=True, BOTTOM_RIGHT=True), False


def row_kernels(arch):
    """Softmax and LayerNorm: one-block and looped rows, every feature on, each dtype."""
    failures = 0
    flags = dict(HAS_MASK=True, STORE_DZ=True, HAS_RES=True, HAS_W=True, HAS_B=True, HAS_DSUM=True, WB_GRAD=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for block, single in ((1024, True), (SM.MAX_BLOCK, True), (SM.MAX_BLOCK, False)):
            for kernel in (SM._softmax_fwd_kernel, SM._softmax_bwd_kernel, LN._ln_fwd_kernel, LN._ln_bwd_kernel):
                config = triton.Config({}, num_warps=SM.warps_for(block), num_stages=1)
                label = f"sm_{arch} {kernel.__name__:<20} {str(dtype)[6:]:<8} BLOCK {block} single={single}"
                failures += report(label, kernel, dtype, dict(flags, BLOCK=block, SINGLE=single), config, arch,
                                   pointers=dict(POINTERS, Mask="*" + TORCH_TO_TRITON[dtype]),
                                   forbid=APPROX if dtype == torch.float32 else ())
    return failures


def first_fitting(kernel, dtype, consts, configs, arch):
    """The config that an untuned launch runs (fastattn.triton.attention._launch): the first whose shared memory
    fits the device (the last if none does)."""
    for config in configs[:-1]:
        try:
            if compile_one(kernel, dtype, consts, config, arch)[0].metadata.shared <= SMEM_LIMIT[arch]:
                return config
        except Exception:  # noqa: BLE001 - report() compiles it again and says what failed
            return config
    return configs[-1]


def report(label, kernel, dtype, consts, config, arch, pointers=POINTERS, no_spill=False, require=(), forbid=()):
    """Compile one kernel, print a line ('ok' or 'FAIL' with the error / shared memory over the limit / a spill
    where no_spill / a PTX instruction of ``require`` missing or one of ``forbid`` present / fp32 attention: a
    running sum folded into a dot, or arithmetic ptxas may contract into an FMA); -> 0 or 1."""
    try:
        compiled, secs, (regs, stack) = compile_one(kernel, dtype, consts, config, arch, pointers)
    except Exception as e:  # report every failure, then fail
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[-700:]}", flush=True)
        return 1
    smem = compiled.metadata.shared
    wrong = [f"no {r}" for r in require if r not in compiled.asm["ptx"]] + [
        f"{f} expected none" for f in forbid if f in compiled.asm["ptx"]]
    if dtype == torch.float32 and kernel_module(kernel) == A.__name__:
        wrong += [f"a running sum folded into a tt.dot ({acc})" for acc in folded_sums(compiled.asm["ttgir"])]
        # fp32 arithmetic without .rn, which ptxas may contract into an FMA (A.FP32_OPTIONS turns that off)
        wrong += [f"{op} expected none" for op in CONTRACTIBLE if op in compiled.asm["ptx"]]
    bad = smem > SMEM_LIMIT[arch] or (no_spill and stack > 0) or wrong
    print(f"{'FAIL' if bad else 'ok  '} {label} shared {smem / 1024:.0f} KiB, {regs} registers, {stack} B stack"
          f"{' (spills)' if no_spill and stack else ''}{''.join(f' ({r})' for r in wrong)} ({secs:.1f}s)",
          flush=True)
    return int(bool(bad))


def tiles(arch, every):
    """The tile tables' entries (or their first, the untuned default) compile without spilling registers for
    causal attention with kv_lens, each element size and head-dim block."""
    flags = dict(WIN_LEFT=False, WIN_RIGHT=True, BOTTOM_RIGHT=False, HAS_BIAS=False, HAS_MASK=False, HAS_KVLENS=True,
                 BIAS_GRAD=False, HAS_DLSE=False, HAS_ALIBI=False, HAS_SOFTCAP=False, COUNT_VISITS=False,
                 VARLEN=False, DROPOUT=False, SPLIT=False, PACK_GQA=False, DELTA_PASS=False, STORE_LO=True)
    kernels = {"fwd": A._fwd_kernel, "dkdv": A._bwd_dkdv_kernel, "dq": A._bwd_dq_kernel}
    failures = 0
    for dtype in (torch.float16, torch.float32):
        for bd in (32, 64, 128, 256):
            # fp16/bf16 training stores the output's rounding residual too
            consts = dict(flags, HEAD_DIM=bd, BLOCK_D=bd, DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
                          STORE_LO=dtype != torch.float32)
            for name, kernel in dict(kernels, **({"delta": A._bwd_delta_pass_kernel} if dtype == torch.float32
                                                  else {})).items():
                consts["DELTA_PASS"] = name == "delta"
                chosen = A.tiles_for(name, dtype.itemsize, bd)
                for i, (m, n, w, s) in enumerate(chosen if every else chosen[:1]):
                    # The loops prefetch their tiles with cp.async; the fp16 defaults run their dots on wgmma
                    # (smaller alternatives, whose dots have fewer than 64 rows, fall back to mma.sync).
                    require = ("cp.async", "wgmma.mma_async") if dtype == torch.float16 and i == 0 else ("cp.async",)
                    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                    failures += report(f"sm_{arch} tiles {name:<4} {str(dtype)[6:]:<8} d{bd:<4} {config}", kernel,
                                       dtype, consts, config, arch, no_spill=True, require=require,
                                       forbid=APPROX + ("ex2.approx",) if dtype == torch.float32 else (),
                                       pointers=fp64_pointers(dtype))
    # The fp16 defaults of the common head dims, with each feature that adds registers to the loops, spill-free too
    features = {"bias+grad": dict(HAS_BIAS=True, BIAS_GRAD=True), "mask": dict(HAS_MASK=True),
                "dropout": dict(DROPOUT=True), "softcap": dict(HAS_SOFTCAP=True), "split-KV": dict(SPLIT=True),
                "packed GQA": dict(PACK_GQA=True, SPLIT=True)}
    for bd in (64, 128):
        for feature, extra in features.items():
            consts = dict(flags, **extra, HEAD_DIM=bd, BLOCK_D=bd, DOT_PREC="tf32")
            for name, kernel in kernels.items():
                if feature in ("split-KV", "packed GQA") and name != "fwd":  # the backward does neither
                    continue
                m, n, w, s = A.tiles_for(name, 2, bd)[0]
                config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                failures += report(f"sm_{arch} tiles {name:<4} float16  d{bd:<4} +{feature} {config}", kernel,
                                   torch.float16, consts, config, arch, no_spill=True,
                                   require=("cp.async", "wgmma.mma_async"))
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--first-only", action="store_true", help="only the first surviving config per kernel")
    ap.add_argument("--all-tiles", action="store_true", help="every tile of the tables must not spill (sm_90)")
    args = ap.parse_args()
    failures = tiles(args.arch, args.all_tiles) if args.arch == 90 else 0
    for dtype, D, flags, every in cases():
        every = every and not args.first_only
        bd = max(16, triton.next_power_of_2(D))
        consts = dict(flags, HEAD_DIM=D, BLOCK_D=bd, DOT_PREC="ieee" if dtype == torch.float32 else "tf32")
        if dtype == torch.float32:  # fp32 outputs keep no rounding residual (their D comes from the D pass)
            consts.update(STORE_LO=False, HAS_LO=False)
        fp32_only = (A._bwd_delta_pass_kernel,) if dtype == torch.float32 else ()
        # every feature on (soft cap, dropout): no approximate division or exponential in fp32 either
        fp32_forbid = APPROX + ("ex2.approx",) if dtype == torch.float32 else ()
        for kernel in (A._fwd_kernel, A._bwd_dkdv_kernel, A._bwd_dq_kernel, A._bwd_delta_kernel, *fp32_only):
            consts["DELTA_PASS"] = kernel is A._bwd_delta_pass_kernel
            if hasattr(kernel, "configs"):
                configs = kernel.early_config_prune(kernel.configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=bd)
                configs = configs if every else [first_fitting(kernel, dtype, consts, configs, args.arch)]
            else:
                configs = [triton.Config({"BLOCK_M": A.DELTA_BLOCK}, num_warps=4, num_stages=1)]
            for c in configs:
                name = "_bwd_dq_kernel (D)" if consts["DELTA_PASS"] else getattr(kernel, "fn", kernel).__name__
                failures += report(f"sm_{args.arch} {name:<18} {str(dtype)[6:]:<8} d{D:<4} {c}", kernel, dtype,
                                   consts, c, args.arch, forbid=fp32_forbid,
                                   pointers=fp64_pointers(dtype))
        for bcast in ((True, False, False, False), (False, True, True, True)):
            failures += report(f"sm_{args.arch} _bwd_dbias_kernel  {str(dtype)[6:]:<8} d{D:<4} broadcast (B, H, M, N) "
                               f"{bcast}", A._bwd_dbias_kernel, dtype,
                               dict(consts, **dict(zip(("ALL_B", "ALL_H", "ALL_M", "ALL_N"), bcast))),
                               A.dbias_config(dtype, D), args.arch, forbid=fp32_forbid,
                               pointers=fp64_pointers(dtype))
    try:
        compile_one(A._dropout_mask_kernel, torch.float16, dict(BLOCK_M=32, BLOCK_N=32), None, args.arch)
        print(f"ok   sm_{args.arch} _dropout_mask_kernel", flush=True)
    except Exception as e:
        failures += 1
        print(f"FAIL sm_{args.arch} _dropout_mask_kernel: {type(e).__name__}: {str(e)[-700:]}", flush=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the split-KV merge
        for bd in (32, 128, 256):
            failures += report(f"sm_{args.arch} _fwd_combine_kernel {str(dtype)[6:]:<8} d{bd:<4}", A._fwd_combine_kernel,
                               dtype, dict(HEAD_DIM=bd, BLOCK_D=bd, ACCURATE=dtype == torch.float32,
                                           STORE_LO=dtype != torch.float32, BLOCK_M=A.COMBINE_BLOCK), None,
                               args.arch, no_spill=True,
                               forbid=APPROX + ("ex2.approx",) if dtype == torch.float32 else (),
                               pointers=fp64_pointers(dtype))
    failures += row_kernels(args.arch)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
