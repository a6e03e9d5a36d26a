"""Shared pieces of the benchmark scripts: options, environment record, timing, tables, JSON and plots.

Timing: on CUDA ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")``, which runs ``fn`` once
(compilation, autotuning), then warm-up calls, then times every call with CUDA events and clears the L2 cache
(a 256 MB buffer write) before each timed call, so no call reads its inputs from L2. On CPU a plain loop with
``time.perf_counter``: warm-up calls, then the median of the timed calls.

The scripts import fastattn only inside ``main`` after :func:`bench_env` has set ``FASTATTN_AUTOTUNE``.

``--rehearse`` (attention, softmax, LayerNorm): on a CPU, the fastattn rows run too, at tiny sizes in fp16, the
Triton kernels under their interpreter and the CUDA kernels under the CPU emulator: a dress rehearsal of the code
that only GPU runs reach (fastattn's providers, ratios, tables, plots with fastattn's series) so that a GPU lease
is not spent finding its bugs. Its times mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

TIMING_NOTE = ("median time; CUDA: triton.testing.do_bench with CUDA events, warm-up excluded, L2 cleared "
               "before every timed call; CPU: time.perf_counter loop, warm-up excluded")


SCORES_CAP = 4e9  # bytes of one B·H·Lq·Lk score tensor above which the unfused (L×L) baselines are skipped
_REHEARSAL = [False]  # set by session() for --rehearse: fastattn's providers run on the CPU


class Skip(Exception):
    """A row or a provider that cannot run here; the message is the reason, printed and stored."""


# ------------------------------------------------------------------------------------------------ options
def first_paragraph(doc: str) -> str:
    """A script's docstring's first paragraph as one line (--help's description; its first line may stop
    mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())


def parser(description: str, budget_s: float, rehearse: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    if rehearse:
        p.add_argument("--rehearse", action="store_true",
                       help="CPU only: also run fastattn's kernels (Triton interpreter, CUDA emulator) at tiny fp16 "
                            "sizes, to exercise the GPU rows' code; the times mean nothing")
    p.add_argument("--quick", action="store_true", help="a small subset (smoke test, python -m fastattn bench)")
    p.add_argument("--full", action="store_true", help="every shape, dtype and baseline (long)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<gpu-name> or benchmarks/results/cpu)")
    p.add_argument("--autotune", action="store_true",
                   help="let fastattn's Triton kernels autotune (FASTATTN_AUTOTUNE=1; ~20-40 s per new shape "
                        "bucket); default off: one fixed config per kernel")
    p.add_argument("--budget", type=float, default=budget_s,
                   help=f"seconds after which the remaining rows are skipped (default {budget_s:g}; 0 = none)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def parse(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    rehearse = getattr(args, "rehearse", False)
    if rehearse and (args.quick or args.full or (args.device or "cpu") != "cpu"):
        p.error("--rehearse runs its own tiny grid on the CPU: no --quick, --full or --device cuda")
    args.device = args.device or ("cpu" if rehearse else "cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine")
    args.mode = "rehearse" if rehearse else "quick" if args.quick else ("full" if args.full else "default")
    return args


@contextlib.contextmanager
def bench_env(args):
    """FASTATTN_AUTOTUNE from --autotune, no NaN poisoning of outputs (a test-only cost); for --rehearse the
    Triton interpreter and the CUDA emulator (read when fastattn is imported); restored afterwards."""
    new = {"FASTATTN_AUTOTUNE": "1" if args.autotune else "0", "FASTATTN_POISON": "0"}
    if args.mode == "rehearse":
        new.update(TRITON_INTERPRET="1", FASTATTN_CUDA_EMULATE="1")
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Session:
    """What every script's main needs: options, environment record, results folder, timer, budget."""
    args: argparse.Namespace
    env: dict
    out_dir: Path
    timer: "Timer"
    budget: "Budget"
    gpu: bool


@contextlib.contextmanager
def session(description: str, argv, budget_s: float, cpu_note: str, rehearse: bool = False):
    """Parse the options, set the environment (:func:`bench_env`) and say what a CPU run skips. ``rehearse``: the
    script offers --rehearse (its grid then has a "rehearse" mode)."""
    args = parse(parser(description, budget_s, rehearse), argv)
    with bench_env(args):
        s = Session(args, env_info(args), results_dir(args), Timer.for_args(args), Budget(args.budget),
                    is_cuda(args.device))
        if args.mode == "rehearse":
            log("rehearsal: fastattn's kernels run on the CPU (Triton interpreter, CUDA emulator) at tiny sizes; "
                "the times mean nothing")
        elif not s.gpu:
            log(f"no CUDA GPU: {cpu_note}")
        _REHEARSAL[0] = args.mode == "rehearse"
        try:
            yield s
        finally:
            _REHEARSAL[0] = False


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def require_cuda(device, what: str = "this row") -> None:
    if not is_cuda(device):
        raise Skip(f"{what} needs a CUDA GPU (running on CPU)")


# ------------------------------------------------------------------------------------------------ environment
def device_name(device) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else "cpu"


def default_results_dir(device) -> Path:
    """benchmarks/results/<gpu name, spaces as underscores> (e.g. NVIDIA_H200), or benchmarks/results/cpu."""
    return RESULTS / device_name(device).replace(" ", "_")


def results_dir(args) -> Path:
    out = Path(args.out or default_results_dir(args.device))
    out.mkdir(parents=True, exist_ok=True)
    return out


def env_info(args) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import fastattn
    cuda = is_cuda(args.device)
    return {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "fastattn": fastattn.__version__,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "autotune": bool(args.autotune),
        "mode": args.mode,
        "timing": TIMING_NOTE,
    }


def env_line(env: dict) -> str:
    return (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
            f"{env['date']} | autotune {'on' if env['autotune'] else 'off (fixed config)'} | {env['mode']} grid")


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timer:
    device: str
    warmup_ms: float
    rep_ms: float
    min_calls: int = 3  # timed calls on CPU at the least

    @classmethod
    def for_args(cls, args) -> "Timer":
        if args.mode == "rehearse":  # the code paths, not the times: one call each
            return cls(args.device, 0, 0, 1)
        warmup, rep = {"quick": (5, 20), "default": (10, 30), "full": (25, 100)}[args.mode]
        return cls(args.device, warmup, rep)

    def __call__(self, fn: Callable, grad_to_none: Sequence[torch.Tensor] = ()) -> float:
        """Median milliseconds of ``fn()``; ``grad_to_none`` tensors get .grad = None before each timed call."""
        grads = [t for t in grad_to_none if t is not None]
        if is_cuda(self.device):
            from triton.testing import do_bench
            with torch.cuda.device(torch.device(self.device)):
                return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=grads or None,
                                      return_mode="median"))
        fn()
        t_end = time.perf_counter() + self.warmup_ms / 1e3
        while time.perf_counter() < t_end:
            fn()
        times = []
        t_end = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < self.min_calls or (time.perf_counter() < t_end and len(times) < 1000):
            for t in grads:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class Budget:
    """Wall-clock allowance of a script: once spent, the remaining rows are skipped with that reason."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def check(self) -> None:
        if self.seconds and time.perf_counter() - self.start > self.seconds:
            raise Skip(f"time budget spent (--budget {self.seconds:g} s)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def reason_of(e: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line for a failed or skipped provider: the error's first line plus the warnings that explain it."""
    if isinstance(e, Skip):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    msg = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    why = []
    for w in caught:  # e.g. SDPA's "Flash attention kernel not used because: ..." warnings
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)\s*", " ", " ".join(str(w.message).split())).strip()
        if text and text not in why:
            why.append(text)
    if why:
        msg += " [" + "; ".join(why) + "]"
    return msg[:400]


def free_memory(device) -> None:
    """Wait for the GPU and return cached blocks. After a kernel fault (illegal address, ...) every CUDA call
    raises again: that is the failed pass's reason, recorded where it ran; here it must not end the run before
    its JSON is written."""
    if is_cuda(device):
        try:
            torch.cuda.synchronize(torch.device(device))
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - see above
            log(f"free_memory: {reason_of(e)}")


@dataclass
class Measured:
    """One provider on one row: milliseconds per pass (None where it could not run) and why not."""
    ms: dict = field(default_factory=dict)
    reason: Optional[str] = None

    def to_json(self) -> dict:
        return {"ms": self.ms, "reason": self.reason}


def time_passes(make: Callable, passes: Sequence[str], timer: Timer) -> Measured:
    """Time ``make()``'s function for each pass of "fwd", "bwd", "fwd+bwd" (and "step": fwd only, named so).

    ``make()`` -> (fwd, dout, grads): ``fwd()`` returns one tensor, ``dout`` its gradient, ``grads`` the leaf
    tensors whose .grad is reset between timed calls. bwd is timed as ``out.backward(dout, retain_graph=True)``
    on one forward's graph; fwd+bwd as ``fwd().backward(dout)``; fwd with autograd recording, as
    FlashAttention's benchmark does. A pass that raises is None, with the reason; the others still run.
    """
    m = Measured()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            fwd, dout, grads = make()
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            m.ms = {p: None for p in passes}
            m.reason = reason_of(e, caught)
            free_memory(timer.device)
            return m
        for p in passes:
            try:
                if p in ("fwd", "step"):
                    fn = fwd
                elif p == "bwd":
                    out = fwd()
                    fn = lambda: out.backward(dout, retain_graph=True)  # noqa: E731
                elif p == "fwd+bwd":
                    fn = lambda: fwd().backward(dout)  # noqa: E731
                else:
                    raise ValueError(f"unknown pass {p!r}")
                m.ms[p] = timer(fn, grads)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                m.ms[p] = None
                m.reason = m.reason or f"{p}: {reason_of(e, caught)}"
            finally:
                out = fn = None
                free_memory(timer.device)
    return m


def copy_bandwidth(device, timer: Timer, nbytes: int) -> float:
    """GB/s of a device-to-device ``dst.copy_(src)`` of ``nbytes``, counting read + write (2·nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    free_memory(device)
    return 2 * nbytes / ms / 1e6


# ------------------------------------------------------------------------------------------------ output
def fmt(x, spec: str = "auto", none: str = "-") -> str:
    """``spec`` "auto": no decimals from 100 up, three significant digits below."""
    if x is None:
        return none
    if spec == "auto":
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return format(x, spec)


@dataclass
class Table:
    title: str
    columns: list
    rows: list = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.columns, *self.rows)]
        line = lambda cells: "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        out = [self.title, line(self.columns), "-" * (sum(widths) + 2 * len(widths) - 2)]
        return "\n".join(out + [line(r) for r in self.rows])

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in self.rows])

    def to_json(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}

    @classmethod
    def from_json(cls, d: dict) -> "Table":
        return cls(d["title"], d["columns"], d["rows"])


def reasons_by_provider(results: dict) -> dict:
    """{provider: {reason: count}} over rows of {provider: Measured-json}."""
    out: dict = {}
    for res in results:
        for prov, m in res.items():
            if m.get("reason"):
                out.setdefault(prov, {}).setdefault(m["reason"], 0)
                out[prov][m["reason"]] += 1
    return out


def notes_from_reasons(reasons: dict) -> list:
    return [f"{prov}: n/a in {n} row(s): {why}" for prov, d in reasons.items() for why, n in d.items()]


def report(name: str, args, env: dict, tables: Sequence[Table], notes: Sequence[str], rows: list,
           plots: Sequence[str], out_dir: Path, extra: Optional[dict] = None, partial: bool = False) -> Path:
    """Print the tables and notes, write ``<out_dir>/<name>.json``; returns the JSON path. ``partial``: only
    write the JSON, marked partial: the scripts call it after every row, so a run killed by its time limit or
    ended by a GPU fault keeps the rows it measured (the final call overwrites it). Written to a temporary file
    and renamed: a kill mid-write leaves the previous version, never a truncated file."""
    if partial:
        notes = [*notes, f"partial: written after row {len(rows)}; the run stopped before the end of its grid"]
    payload = {"benchmark": name, "env": env, "notes": list(notes), "tables": [t.to_json() for t in tables],
               "plots": list(plots), "rows": rows, "partial": partial, **(extra or {})}
    path = out_dir / f"{name}.json"
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    if partial:
        return path
    print()
    print(env_line(env))
    for t in tables:
        print()
        print(t.text())
    if notes:
        print()
        print("notes:")
        for n in notes:
            print(f"  - {n}")
    print(f"\nwrote {path}" + "".join(f", {out_dir / p}" for p in plots))
    return path


def plot_lines(path: Path, title: str, panels: Sequence[tuple], xlabel: str, ylabel: str, *,
               logx: bool = True, logy: bool = False) -> Optional[str]:
    """One PNG, one panel per (subtitle, {label: [(x, y), ...]}); returns the file name, or None (reason printed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot {path.name}: matplotlib is not installed")
        return None
    width = max(7.0, 5.5 * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.4), squeeze=False)
    for ax, (subtitle, series) in zip(axes[0], panels):
        for label, pts in series.items():
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(subtitle)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(textwrap.fill(title, int(width * 12)), fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def progress(items: Sequence, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def log(msg: str) -> None:
    """A line printed without breaking the progress bar."""
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
    except ImportError:
        print(msg)
    sys.stdout.flush()


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def compiled(fn: Callable) -> Callable:
    """A fresh ``torch.compile`` of ``fn`` after clearing Dynamo's caches (one compile per row, no recompile
    limit reached, no automatic dynamic shapes across rows)."""
    torch._dynamo.reset()
    return torch.compile(fn)


def require_compile(device, mode: str, in_subset: bool) -> None:
    """torch.compile baselines: CUDA only (CPU compile takes minutes of C++), and outside --full only on the
    rows marked for them (compile time)."""
    if not is_cuda(device):
        raise Skip("torch.compile baselines run on CUDA only (on CPU the C++ compile takes minutes)")
    if mode == "quick":
        raise Skip("--quick: no torch.compile baselines (compile time); run without --quick")
    if not in_subset and mode != "full":
        raise Skip("compiled baselines on a subset of rows by default (compile time); --full for all")


def best_and_ratios(results: dict, fast: Sequence[str], others: Sequence[str], passes: Sequence[str]):
    """-> ({pass: best other provider}, {pass: {fast provider: best other's ms ÷ its ms}}) (speed-up ratios)."""
    best_other, ratio = {}, {}
    for p in passes:
        timed = [(results[o]["ms"][p], o) for o in others if results[o]["ms"].get(p)]
        best = min(timed) if timed else None
        best_other[p] = best[1] if best else None
        ratio[p] = {f: (best[0] / results[f]["ms"][p] if best and results[f]["ms"].get(p) else None) for f in fast}
    return best_other, ratio


def skipped_row(reason: str, providers: Sequence[str], passes: Sequence[str]) -> dict:
    m = Measured({p: None for p in passes}, reason).to_json()
    return {p: dict(m) for p in providers}


# ------------------------------------------------------------------------------------------------ row-wise ops
@dataclass(frozen=True)
class RowCase:
    """One (rows × N) problem of a row-wise op (softmax, LayerNorm): bytes counted as ``reads_writes`` = (fwd,
    bwd) tensors of rows × N elements that must be read or written once."""
    op: str
    dtype: torch.dtype
    rows: int
    N: int
    reads_writes: tuple
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{self.op} {dtype_name(self.dtype)} {self.rows}x{self.N}"

    def nbytes(self, p: str) -> int:
        return self.reads_writes[{"fwd": 0, "bwd": 1}[p]] * self.rows * self.N * torch.finfo(self.dtype).bits // 8

    def to_json(self) -> dict:
        return {"case": self.name, "op": self.op, "dtype": dtype_name(self.dtype), "rows": self.rows, "N": self.N,
                "bytes": {p: self.nbytes(p) for p in ("fwd", "bwd")}}


def row_sizes(mode: str, gpu: bool) -> tuple:
    """(elements per tensor, widths, copy bytes) for the row-wise benchmarks."""
    if mode == "rehearse":
        return 1 << 12, (64, 1024), 1 << 20
    if not gpu:
        return (1 << 18 if mode == "quick" else 1 << 20), (1024, 4096), 64 << 20
    widths = (1024, 2048, 4096, 8192, 16384, 32768)
    return (1 << 24 if mode == "quick" else 1 << 28), ((4096, 32768) if mode == "quick" else widths), (
        256 << 20 if mode == "quick" else 1 << 30)


def rowwise_main(name: str, description: str, argv, budget_s: float, grid: Callable, make: Callable,
                 fast: Sequence[str], others: Sequence[str], notes: Sequence[str]) -> int:
    """Driver of bench_softmax / bench_layer_norm: GB/s per provider, ratio to the best other and to a
    device-to-device copy measured in the same run.

    grid(mode, gpu) -> [RowCase]; make(case, provider, device, mode) -> (fwd, dout, grads) or raises Skip."""
    passes = ("fwd", "bwd")
    providers = (*fast, *others)
    with session(description, argv, budget_s, "fastattn and torch.compile rows are skipped (reason in each row); "
                 "torch eager and the copy ceiling run on CPU at small sizes", rehearse=True) as s:
        args, env, out_dir, timer, budget, gpu = s.args, s.env, s.out_dir, s.timer, s.budget, s.gpu
        copy_bytes = row_sizes(args.mode, gpu)[2]
        copy_gbs = copy_bandwidth(args.device, timer, copy_bytes)
        rows = []
        for case in progress(grid(args.mode, gpu), name):
            row = case.to_json()
            try:
                budget.check()
                row["results"] = {p: time_passes(lambda p=p: make(case, p, args.device, args.mode), passes,
                                                 timer).to_json() for p in providers}
            except Skip as e:
                row["results"] = skipped_row(str(e), providers, passes)
            for res in row["results"].values():
                res["gbps"] = {p: (case.nbytes(p) / (ms * 1e-3) / 1e9 if ms else None) for p, ms in res["ms"].items()}
            row["best_other"], row["ratio"] = best_and_ratios(row["results"], fast, others, passes)
            rows.append(row)
            report(name, args, env, [], notes, rows, [], out_dir, partial=True)

        title = f"{name} GB/s (copy ceiling {copy_gbs:.0f} GB/s; ratio = fastattn ÷ best other)"
        short = {v: v.split("-", 1)[1] for v in providers}  # fastattn-triton -> triton, torch-eager -> eager
        t = Table(title, ["case", "pass", *short.values(), "best other", *(f"{short[f]}÷best" for f in fast),
                          *(f"{short[f]}÷copy" for f in fast)])
        for r in rows:
            for p in passes:
                res = r["results"]
                t.add(r["case"] if p == "fwd" else "", p, *(fmt(res[v]["gbps"][p]) for v in providers),
                      short.get(r["best_other"][p], "-"), *(fmt(r["ratio"][p][f], ".2f") for f in fast),
                      *(fmt(res[f]["gbps"][p] / copy_gbs if res[f]["gbps"][p] else None, ".2f") for f in fast))
        pngs = []
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["op"], r["dtype"]), []).append(r)
        for (op, dt), rs in ([] if args.no_plots else groups.items()):
            if len(rs) < 2:
                continue
            panels = []
            for p in passes:
                series = {v: [(r["N"], r["results"][v]["gbps"][p]) for r in rs] for v in providers}
                series["device copy"] = [(r["N"], copy_gbs) for r in rs]
                panels.append((p, series))
            png = plot_lines(out_dir / f"{op}_{dt}.png", f"{op} {dt}: GB/s vs row width — {env['device']}, "
                             f"torch {env['torch']}, {env['date'][:10]}", panels, "row width N", "GB/s")
            if png:
                pngs.append(png)
        all_notes = [*notes, f"device-to-device copy of {copy_bytes >> 20} MiB: {copy_gbs:.0f} GB/s "
                     "(read + write bytes), measured in this run"]
        all_notes += notes_from_reasons(reasons_by_provider([r["results"] for r in rows]))
        report(name, args, env, [t], all_notes, rows, pngs, out_dir,
               {"copy_gbps": copy_gbs, "elapsed_s": round(budget.elapsed(), 1)})
    return 0


def fastattn_backend(provider: str, device) -> str:
    """'fastattn-triton' -> 'triton' after checking that it can run here (Skip with the reason otherwise)."""
    backend = provider.split("-", 1)[1]
    if not _REHEARSAL[0]:
        require_cuda(device, f"fastattn backend={backend!r}")
    from fastattn import dispatch
    if backend not in dispatch.available_backends(device):
        raise Skip(f"backend {backend!r} is not available in this build ({dispatch.available_backends(device)})")
    return backend


def row_grid(op: str, reads_writes: tuple, mode: str, gpu: bool, *, widths: Optional[Sequence[int]] = None,
             other_dtypes: bool = True) -> list:
    """bf16 over the widths; fp16 and fp32 at two widths (every width with --full); fp32 only on CPU.
    torch.compile rows (a compile each): bf16 at 4096 and 32768 by default, every row with --full."""
    numel, all_widths, _ = row_sizes(mode, gpu)
    widths = [n for n in (widths or all_widths) if n in all_widths]
    mk = lambda dt, n: RowCase(op, dt, max(1, numel // n), n, reads_writes,  # noqa: E731
                               compiled=mode == "full" or (dt == torch.bfloat16 and n in (4096, 32768)))
    if mode == "rehearse":  # fp16: the Triton interpreter cannot run bf16
        return [mk(torch.float16, n) for n in widths]
    if not gpu:
        return [mk(torch.float32, n) for n in widths]
    cases = [mk(torch.bfloat16, n) for n in widths]
    if other_dtypes and mode != "quick":
        few = widths if mode == "full" else [n for n in widths if n in (4096, 32768)]
        cases += [mk(dt, n) for dt in (torch.float16, torch.float32) for n in few]
    return cases
