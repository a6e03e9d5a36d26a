"""pytest-benchmark timings of the CPU-visible paths (reference and torch fallbacks, small sizes, 3 rounds), and
each benchmark script's ``main(["--quick", "--out", tmp])``: it runs here, says why the GPU rows skip, and
writes valid JSON (plus SUMMARY.md from it).

``pytest --benchmark-only tests/test_benchmarks.py`` runs the timings alone, anywhere."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.__main__ import BENCH_SCRIPTS, _load_benchmark

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _pedantic(benchmark, fn):
    return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def _qkv(L=128, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, L, 32, generator=g).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("causal", [False, True])
def test_bench_reference_attention_fwd(benchmark, causal):
    q, k, v = _qkv()
    out = _pedantic(benchmark, lambda: reference.attention(q, k, v, causal=causal))
    assert out.shape == q.shape


@pytest.mark.benchmark(group="attention")
def test_bench_reference_attention_fwd_bwd(benchmark):
    q, k, v = _qkv(requires_grad=True)
    _pedantic(benchmark, lambda: reference.attention(q, k, v, causal=True).sum().backward())
    assert q.grad is not None


@pytest.mark.benchmark(group="attention")
def test_bench_attention_torch_backend(benchmark):
    q, k, v = _qkv()
    kv_lens = torch.tensor([100, 128])
    out = _pedantic(benchmark, lambda: fastattn.attention(q, k, v, kv_lens=kv_lens, backend="torch"))
    assert torch.isfinite(out).all()


@pytest.mark.benchmark(group="attention")
def test_bench_sdpa_torch_backend(benchmark):
    q, k, v = _qkv()
    out = _pedantic(benchmark, lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert out.shape == q.shape


@pytest.mark.benchmark(group="rowwise")
@pytest.mark.parametrize("op", ["reference", "torch-backend"])
def test_bench_softmax(benchmark, op):
    x = torch.randn(256, 1024)
    fn = (lambda: reference.softmax(x, -1)) if op == "reference" else (lambda: fastattn.softmax(x, -1, backend="torch"))
    y = _pedantic(benchmark, fn)
    torch.testing.assert_close(y.sum(-1), torch.ones(256))


@pytest.mark.benchmark(group="rowwise")
@pytest.mark.parametrize("op", ["reference", "torch-backend", "add-torch-backend"])
def test_bench_layer_norm(benchmark, op):
    x, r, w, b = torch.randn(256, 1024), torch.randn(256, 1024), torch.randn(1024), torch.randn(1024)
    fn = {"reference": lambda: reference.layer_norm(x, (1024,), w, b),
          "torch-backend": lambda: fastattn.layer_norm(x, (1024,), w, b, backend="torch"),
          "add-torch-backend": lambda: fastattn.add_layer_norm(x, r, (1024,), w, b, backend="torch")}[op]
    y = _pedantic(benchmark, fn)
    assert y.shape == x.shape


@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_script_quick_on_this_machine(name, tmp_path, capsys):
    """main(["--quick", "--out", tmp]) runs, prints a table and why rows skip, and writes valid JSON."""
    module = _load_benchmark(BENCH_DIR / f"{name}.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert module.main(["--quick", "--out", str(tmp_path), "--device", device, "--no-plots"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert data["benchmark"] == module.NAME and data["rows"]
    assert {"device", "torch", "triton", "cuda", "date", "autotune"} <= set(data["env"])
    assert data["env"]["autotune"] is False
    assert data["tables"] and data["tables"][0]["rows"]
    if device == "cpu":  # says so; the GPU-only rows are skipped with a reason, printed and stored
        assert "no CUDA GPU" in printed
        if name != "bench_transformer":  # (its fastattn modules run their torch fallback on CPU)
            assert any("needs a CUDA GPU" in n for n in data["notes"]) and "needs a CUDA GPU" in printed
    summary = _load_benchmark(BENCH_DIR / "summary.py")
    assert summary.main(["--out", str(tmp_path)]) == 0
    assert module.NAME in (tmp_path / "SUMMARY.md").read_text()


def test_plot_helper_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    common = _load_benchmark(BENCH_DIR / "common.py")
    name = common.plot_lines(tmp_path / "p.png", "t", [("a", {"x": [(1, 2.0), (2, 3.0)]})], "x", "y", logy=True)
    assert name == "p.png" and (tmp_path / "p.png").stat().st_size > 0


def test_a_run_stopped_early_keeps_its_rows(tmp_path, monkeypatch):
    """The JSON is rewritten after every row (marked partial): a run ended by its time limit or a GPU fault keeps
    what it measured, and SUMMARY.md says it is partial. free_memory survives a sticky CUDA error (here any error
    of the synchronize call)."""
    bench = _load_benchmark(BENCH_DIR / "bench_attention.py")
    calls = []
    real = bench.run_case

    def second_row_faults(case, *args):
        calls.append(case)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(case, *args)

    monkeypatch.setattr(bench, "run_case", second_row_faults)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--no-plots"])
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["partial"] and len(data["rows"]) == 1 and data["tables"]
    assert not list(tmp_path.glob(".*.tmp"))
    summary = _load_benchmark(BENCH_DIR / "summary.py")
    (tmp_path / "softmax.json").write_text('{"benchmark": "softmax", "env": ')  # truncated: skipped, said
    assert summary.main(["--out", str(tmp_path)]) == 0
    assert "(partial" in (tmp_path / "SUMMARY.md").read_text()

    common = bench.common
    monkeypatch.setattr(common, "is_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    common.free_memory("cuda")  # logs, does not raise


def test_attention_window_rows(tmp_path, capsys):
    """Sliding-window rows: w ∈ {256, 1024} × L = 2k..32k, causal local, in the GPU grid (one in --quick); a
    GPU-sized row skips on a CPU with the reason; the toy CPU row gives SDPA (dense mask) and the reference the
    same attention, its FLOPs count the pairs inside the window, and the quick CPU run prints the window table."""
    bench = _load_benchmark(BENCH_DIR / "bench_attention.py")
    rows = [c for c in bench.grid("default", gpu=True) if c.window]
    assert sorted((c.window, c.Lq) for c in rows) == [(w, L) for w in (256, 1024)
                                                      for L in (2048, 4096, 8192, 16384, 32768)]
    assert all(c.causal and c.Lq == c.Lk and c.compiled and c.gpu_only for c in rows)
    assert any(c.window for c in bench.grid("quick", gpu=True))
    if not torch.cuda.is_available():
        with pytest.raises(bench.Skip, match="needs a CUDA GPU"):
            bench.run_case(rows[-1], "cpu", "default", None)

    toy = next(c for c in bench.grid("quick", gpu=False) if c.window)
    vis = reference.visible_keys(1, toy.Lq, toy.Lk, device="cpu", causal=True, window_size=(toy.window, -1))
    assert toy.window_pairs == int(vis.sum()) and toy.window_pairs < toy.Lq * (toy.Lq + 1) // 2
    x = bench.inputs(toy, "cpu")
    outs = [make()[0]().detach() for make in (lambda: bench.make_sdpa(toy, x, "cpu", "sdpa-math"),
                                             lambda: bench.make_reference(toy, x, "cpu", None))]
    assert torch.equal(x["window_mask"], vis[0, 0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)

    assert bench.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--no-plots"]) == 0
    data = json.loads((tmp_path / "attention.json").read_text())
    row = next(r for r in data["rows"] if r["window"])
    assert "needs a CUDA GPU" in row["results"]["fastattn-triton"]["reason"]
    assert row["results"]["sdpa-math"]["ns_per_token"]["fwd"] > 0
    assert any(t["title"].startswith("sliding-window") for t in data["tables"])
    assert "ns per query token" in capsys.readouterr().out


def test_attention_decode_rows(tmp_path, capsys):
    """Decoding rows (Lq = 1, and 4 for speculative decoding; GQA 32/8, d128; forward only) in the GPU grids, with
    the Triton forward also timed with split-KV and with packed GQA off, and the CUDA forward likewise; the toy CPU
    row runs SDPA / the reference, and the decoding table is printed."""
    bench = _load_benchmark(BENCH_DIR / "bench_attention.py")
    rows = [c for c in bench.grid("default", gpu=True) if c.kind == "decode"]
    assert sorted((c.B, c.Lq, c.Lk) for c in rows) == sorted(
        [(b, 1, L) for b in (1, 8) for L in (4096, 16384, 65536)] + [(8, 4, 16384)])
    assert all((c.H, c.Hkv, c.D) == (32, 8, 128) and c.passes == ("fwd",) for c in rows)
    assert rows[0].kv_bytes == 2 * 1 * 8 * 4096 * 128 * 2
    assert any(c.kind == "decode" for c in bench.grid("quick", gpu=True))
    toy = next(c for c in bench.grid("quick", gpu=False) if c.kind == "decode")
    assert set(bench.ABLATIONS) <= set(bench.makers(toy, bench.inputs(toy, "cpu"), "cpu", "quick"))

    assert bench.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--no-plots"]) == 0
    data = json.loads((tmp_path / "attention.json").read_text())
    row = next(r for r in data["rows"] if r["kind"] == "decode")
    assert set(row["results"]["sdpa-math"]["ms"]) == {"fwd"} and row["results"]["sdpa-math"]["ms"]["fwd"] > 0
    for name in bench.ABLATIONS:
        assert "needs a CUDA GPU" in row["results"][name]["reason"]
    assert any(t["title"].startswith("decoding") for t in data["tables"])
    printed = capsys.readouterr().out
    assert "split gain" in printed and "pack gain" in printed and "cuda pack gain" in printed


@pytest.mark.parametrize("name", ["bench_attention", "bench_softmax", "bench_layer_norm"])
def test_rehearsal_runs_the_fastattn_rows_on_cpu(name, tmp_path, capsys):
    """--rehearse: the rows a CPU run skips (fastattn's providers, the decoding ablations, the ratios, the window /
    decoding tables, plots with fastattn's series) run here on the kernels' CPU stand-ins, so a GPU lease does not
    meet their first bug. Every fastattn provider gives a time for every pass of every row, and a ratio."""
    module = _load_benchmark(BENCH_DIR / f"{name}.py")
    # --budget 0: every row, however loaded the machine (a loaded CI machine once spent the default budget)
    assert module.main(["--rehearse", "--out", str(tmp_path), "--budget", "0"]) == 0
    printed = capsys.readouterr().out
    assert "rehearsal" in printed and "rehearse grid" in printed
    data = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert data["env"]["mode"] == "rehearse" and len(data["rows"]) >= 2
    for row in data["rows"]:
        fast = [p for p in row["results"] if p.startswith("fastattn")]
        assert len(fast) >= 2, fast
        for p in fast:
            res = row["results"][p]
            assert res["reason"] is None and all(ms and ms > 0 for ms in res["ms"].values()), (row["case"], p, res)
        for pas, ratios in row["ratio"].items():
            assert all(r and r > 0 for r in ratios.values()), (row["case"], pas, ratios)
    kinds = {r.get("kind") for r in data["rows"]}
    if name == "bench_attention":
        assert kinds == {"sweep", "padding", "gqa", "bias", "cross", "window", "varlen", "decode", "sinks"}
        assert set(module.ABLATIONS) <= set(next(r for r in data["rows"] if r["kind"] == "decode")["results"])
        assert "split gain" in printed and "ns per query token" in printed
    if importlib.util.find_spec("matplotlib"):
        assert data["plots"] and all((tmp_path / p).stat().st_size > 0 for p in data["plots"])
    with pytest.raises(SystemExit):
        module.main(["--rehearse", "--quick", "--out", str(tmp_path)])
    assert "--rehearse runs its own tiny grid" in capsys.readouterr().err


def test_attention_flops_count_the_visible_pairs():
    """Every row of the GPU grids (default and --full) counts 4·H·D·pairs per forward, the pairs being those the
    reference's mask makes visible (per sequence for varlen rows), up to FlashAttention's causal convention of
    Lq²/2 for Lq(Lq + 1)/2 (a relative difference of at most 1/n). Small stand-ins of each row keep it cheap:
    the same kind, causality, padding and window at sizes where the mask is built in a blink."""
    import dataclasses
    bench = _load_benchmark(BENCH_DIR / "bench_attention.py")
    kinds = {(c.kind, c.causal, c.pad, bool(c.window), c.Lq == c.Lk)
             for mode in ("default", "full") for c in bench.grid(mode, gpu=True)}
    for kind, causal, pad, window, square in sorted(kinds, key=str):
        for L in (64, 96):
            case = dataclasses.replace(
                next(c for c in bench.grid("full", gpu=True)
                     if (c.kind, c.causal, c.pad, bool(c.window), c.Lq == c.Lk) == (kind, causal, pad, window, square)),
                B=3, H=2, Hkv=2, Lq=L if square or kind != "decode" else 1, Lk=L if square else 2 * L, D=8,
                window=16 if window else 0)
            if kind == "varlen":
                counted = sum(int(reference.visible_keys(1, n, n, device="cpu", causal=causal).sum()) if causal
                              else n * n for n in case.lengths)
            else:
                kv_lens = torch.full((case.B,), case.kv_len) if case.pad else None
                vis = reference.visible_keys(case.B, case.Lq, case.Lk, device="cpu", causal=causal,
                                             kv_lens=kv_lens, window_size=(case.window, -1) if window else (-1, -1))
                counted = case.B * case.Lq * case.Lk if vis is None else int(vis.expand(case.B, 1, case.Lq, case.Lk).sum())
            pairs = case.flops("fwd") / (4.0 * case.H * case.D)
            slack = counted / min(case.Lq, case.kv_len) if causal and not window else 0.0
            assert abs(pairs - counted) <= slack, (case.name, pairs, counted)
            assert case.flops("fwd+bwd") == pytest.approx(3.5 * case.flops("fwd"))
