"""``python -m fastattn info | check | bench | demo``.

info   versions, devices and the backends that can run here.
check  every available kernel backend × op over a small matrix of cases against the float64 reference
       (DESIGN.md §5); prints a table and exits 1 if any row fails. Without a GPU the Triton kernels run
       under the interpreter (TRITON_INTERPRET=1 is set here, before they are imported).
bench  the --quick subset of every benchmark script in benchmarks/ (a source checkout), then its SUMMARY.md;
       options: --out DIR, --autotune, --device cuda|cpu. The full suites: `make bench` or the scripts themselves.
demo   trains the reference Transformer fused and unfused from one seed and prints both loss curves (--help).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def _info() -> int:
    import fastattn
    from fastattn import dispatch

    rows = [("fastattn", fastattn.__version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    rows.append(("CUDA (torch)", torch.version.cuda or "none"))
    from fastattn import cuda
    ext, why = cuda._load()
    rows.append(("fastattn._C", f"{ext.version}, built for sm_{', sm_'.join(ext.compiled_archs())}" if ext else why))
    emu, why_emu = cuda._load("_C_emu")
    rows.append(("fastattn._C_emu", f"{emu.version}, the CUDA kernels on CPU tensors with FASTATTN_CUDA_EMULATE=1 "
                 f"(now {os.environ.get('FASTATTN_CUDA_EMULATE', '0')})" if emu else why_emu))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")))
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for d in devices:
        name = torch.cuda.get_device_name(d) if d.startswith("cuda") else platform.processor() or "cpu"
        rows.append((f"{d} ({name})", ", ".join(dispatch.available_backends(d))))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def attention_cases(gpu: bool):
    from fastattn.testing import AttentionCase

    dtypes = [torch.float16, torch.bfloat16, torch.float32] if gpu else [torch.float16, torch.float32]
    L = 1000 if gpu else 70
    for dtype in dtypes:
        yield AttentionCase(Lq=L, Lk=L, D=64, dtype=dtype)
        yield AttentionCase(Lq=L, Lk=L, D=64, dtype=dtype, causal=True)
        yield AttentionCase(Lq=L // 2, Lk=L, D=80, dtype=dtype, causal=True, alignment="bottom_right", kv_lens=True)
        yield AttentionCase(Lq=L, Lk=L // 3, D=40, dtype=dtype, key_padding=True, H=4, Hkv=2)
        yield AttentionCase(Lq=L, Lk=L, D=128, dtype=dtype, bool_mask="2d")
        yield AttentionCase(Lq=L, Lk=L, D=64, dtype=dtype, bias="heads", bias_grad=True, lse_grad=True)
        yield AttentionCase(Lq=17, Lk=113, D=256, dtype=dtype, H=4, Hkv=1, logit_scale=10.0)
        yield AttentionCase(Lq=L, Lk=L, D=64, dtype=dtype, causal=True, dropout=0.1)
        yield AttentionCase(D=64, dtype=dtype, H=4, Hkv=2, causal=True, varlen=((L, L), (1, 1), (L // 3, L // 3)))
        yield AttentionCase(Lq=L, Lk=L, D=64, dtype=dtype, H=4, Hkv=2, causal=True, window=(L // 4, -1),
                            alibi="heads", softcap=20.0, logit_scale=4.0)
        yield AttentionCase(Lq=L // 2, Lk=L, D=64, dtype=dtype, H=4, Hkv=2, causal=True, kv_lens=True, sinks=True,
                            lse_grad=True)


def softmax_cases(gpu: bool):
    from fastattn.testing import SoftmaxCase

    rows = 256 if gpu else 4
    for dtype in [torch.float16, torch.bfloat16, torch.float32] if gpu else [torch.float16, torch.float32]:
        for n in (1, 1000, 4096, 40000):
            yield SoftmaxCase(shape=(rows, n), dtype=dtype, seed=n)
        yield SoftmaxCase(shape=(2, 4, 8, 100), dtype=dtype, scale=0.125, mask="lead", mask_grad=True)
        yield SoftmaxCase(shape=(4, 7, 33), dim=1, dtype=dtype)


def layer_norm_cases(gpu: bool):
    from fastattn.testing import LayerNormCase

    rows = 512 if gpu else 8
    for dtype in [torch.float16, torch.bfloat16, torch.float32] if gpu else [torch.float16, torch.float32]:
        for n in (1, 768, 4096, 40000):
            yield LayerNormCase(shape=(rows if n < 8192 else 4, n), dtype=dtype, seed=n)
        yield LayerNormCase(shape=(rows, 1000), dtype=dtype, residual=True, prenorm=True)
        yield LayerNormCase(shape=(rows, 512), dtype=dtype, residual=True, weight=False, offset=100.0)


def _check() -> int:
    gpu = torch.cuda.is_available()
    if not gpu:  # the kernels on the CPU: Triton's interpreter, the CUDA kernels under the emulator (if built)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("FASTATTN_CUDA_EMULATE", "1")
    # A numerics check, not a benchmark: the default config of each kernel, no autotuning per case.
    os.environ.setdefault("FASTATTN_AUTOTUNE", "0")
    from fastattn import dispatch
    from fastattn import testing
    device = "cuda" if gpu else "cpu"
    backends = [b for b in dispatch.available_backends(device) if b != "torch"]
    print(f"fastattn check on {torch.cuda.get_device_name() if gpu else 'cpu (Triton interpreter, CUDA emulator)'}: "
          f"backends {backends}; rule max|out − ref64| <= F·max|ref_same_dtype − ref64| + floor (F=2 fwd, 3 bwd)")
    header = f"{'op':<10} {'case':<66} {'backend':<7} {'worst':<6} {'max err':>9} {'baseline':>9} {'ratio':>6}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    t0 = time.time()
    ops = [("attention", attention_cases, testing.run_attention_case),
           ("softmax", softmax_cases, testing.run_softmax_case),
           ("layer_norm", layer_norm_cases, testing.run_layer_norm_case)]
    for backend in backends:
        for op, cases, run in ops:
            for case in cases(gpu):
                op_name = "add_ln" if op == "layer_norm" and case.residual else op
                if backend == "cuda" and op == "attention" and case.dtype == torch.float32:
                    print(f"{op_name:<10} {str(case):<66} {backend:<7} skipped: the CUDA attention kernels are "
                          "fp16/bf16 only")
                    continue
                try:
                    results = run(case, backend, device)
                except Exception as e:  # a crash is a failed row, reported, not a traceback mid-table
                    failures += 1
                    print(f"{op_name:<10} {str(case):<66} {backend:<7} error: {type(e).__name__}: {e}")
                    continue
                worst = max(results, key=lambda r: r.ratio / r.factor)
                ok = all(r.ok for r in results)
                failures += not ok
                print(f"{op_name:<10} {str(case):<66} {backend:<7} {worst.name:<6} {worst.max_error:9.2e} "
                      f"{worst.baseline_error:9.2e} {worst.ratio:6.2f}  {'pass' if ok else 'FAIL'}", flush=True)
    print(f"{'all rows pass' if not failures else f'{failures} rows FAIL'} ({time.time() - t0:.0f}s)")
    return 1 if failures else 0


BENCH_SCRIPTS = ("bench_attention", "bench_softmax", "bench_layer_norm", "bench_transformer", "bench_memory",
                 "bench_context_parallel")


def _load_benchmark(path):
    """Import a benchmark script by path (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_fastattn_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench(argv) -> int:
    import traceback
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m fastattn bench")
    p.add_argument("--out", default=None)
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (bench_dir / "common.py").is_file():
        print(f"no benchmarks/ folder next to the fastattn package ({bench_dir}): `bench` needs a source checkout "
              "(pip install -e .)")
        return 1
    common_args = ["--quick"] + (["--out", args.out] if args.out else []) + (["--autotune"] if args.autotune else [])
    common_args += ["--device", args.device] if args.device else []
    failed = []
    for name in BENCH_SCRIPTS:
        print(f"\n===== {name} --quick", flush=True)
        try:
            _load_benchmark(bench_dir / f"{name}.py").main(common_args)
        except Exception:  # one broken script does not stop the others
            traceback.print_exc()
            failed.append(name)
    summary = _load_benchmark(bench_dir / "summary.py")
    out = args.out or str(summary.common.default_results_dir(args.device or ("cuda" if torch.cuda.is_available()
                                                                                else "cpu")))
    summary.main(["--out", out])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "check", "bench", "demo"])
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command's own options (--help too) go to its parser: only the first word is ours.
    command = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv).command
    rest = argv[1:]
    if command == "bench":
        return _bench(rest)
    if command == "demo":
        from .demo import main as demo
        return demo(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": _info, "check": _check}[command]()


if __name__ == "__main__":
    sys.exit(main())
