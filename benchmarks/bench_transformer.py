"""Training step (forward + backward + AdamW step) in tokens/s: fastattn's modules against torch.nn and the
reference Transformer fused against unfused.

  encoder_layer  fastattn.nn.TransformerEncoderLayer vs torch.nn.TransformerEncoderLayer, the same weights
                 (batch_first=True, post-norm, ReLU, dim_feedforward = 4·d_model, dropout 0), loss mean(out²).
  transformer    fastattn.nn.transformer.Transformer(fused=True) vs the same model with fused=False (its unfused
                 twin built from fastattn.reference), the same weights: 2 encoder + 2 decoder layers, vocabulary
                 8192 (256 on CPU), source and target both L tokens, cross-entropy loss on random tokens.
Parameters in bf16 on the GPU (fp32 on CPU); 16k tokens per step (B = 16384 // L); dropout 0 (fastattn's
attention runs dropout through the torch fallback). tokens/s = B·L / median step time.

    python benchmarks/bench_transformer.py [--quick | --full] [--out DIR]
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import Skip  # noqa: E402

NAME = "transformer"
TOKENS = 16384
VOCAB = 8192
PROVIDERS = {"encoder_layer": ("torch.nn", "fastattn.nn"), "transformer": ("fused=False", "fused=True")}


@dataclass(frozen=True)
class Case:
    model: str
    d_model: int
    nhead: int
    L: int
    B: int
    causal: bool = False
    vocab: int = VOCAB

    @property
    def name(self) -> str:
        return f"{self.model} d{self.d_model} h{self.nhead} B{self.B} L{self.L}" + (" causal" if self.causal else "")

    def to_json(self) -> dict:
        return {"case": self.name, "model": self.model, "d_model": self.d_model, "nhead": self.nhead,
                "L": self.L, "B": self.B, "causal": self.causal, "tokens": self.B * self.L,
                "vocab": self.vocab}


def grid(mode: str, gpu: bool) -> list:
    if not gpu:
        return [Case("encoder_layer", 64, 4, L, 2) for L in (64, 128)] + [Case("transformer", 64, 4, 64, 2, vocab=256)]
    mk = lambda model, d, h, L, **kw: Case(model, d, h, L, max(1, TOKENS // L), **kw)  # noqa: E731
    if mode == "quick":
        return [mk("encoder_layer", 1024, 16, 1024), mk("transformer", 512, 8, 1024)]
    seqs = (512, 1024, 2048, 4096)
    cases = [mk("encoder_layer", 1024, 16, L) for L in seqs]
    cases += [mk("encoder_layer", 512, 8, L) for L in (seqs if mode == "full" else (512, 2048))]
    cases += [mk("encoder_layer", 1024, 16, L, causal=True) for L in (seqs if mode == "full" else (4096,))]
    cases += [mk("transformer", 512, 8, L) for L in (seqs if mode == "full" else (512, 2048, 4096))]
    return cases


def fastattn_class(name: str):
    import importlib
    for module in ("fastattn.nn", "fastattn.nn.transformer"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if cls is not None:
            return cls
    raise Skip(f"fastattn.nn has no {name} in this build")


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if common.is_cuda(device) else torch.float32


def _step(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()
    return step, None, []


def make_encoder_layer(case: Case, provider: str, device: str, weights: dict):
    cls = torch.nn.TransformerEncoderLayer if provider == "torch.nn" else fastattn_class("TransformerEncoderLayer")
    layer = cls(case.d_model, case.nhead, dim_feedforward=4 * case.d_model, dropout=0.0, batch_first=True)
    if "state" not in weights:
        weights["state"] = layer.state_dict()
    layer.load_state_dict(weights["state"])
    layer = layer.to(device=device, dtype=_dtype(device)).train()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.B, case.L, case.d_model, device=device, dtype=_dtype(device), generator=g)
    mask = torch.ones(case.L, case.L, dtype=torch.bool, device=device).triu(1) if case.causal else None
    return _step(layer, lambda m: m(x, src_mask=mask, is_causal=case.causal).float().square().mean())


def make_transformer(case: Case, provider: str, device: str, weights: dict):
    cls = fastattn_class("Transformer")
    params = inspect.signature(cls).parameters
    if "fused" not in params:
        raise Skip(f"fastattn.nn.transformer.Transformer{inspect.signature(cls)} takes no fused= argument")
    model = cls(case.vocab, case.vocab, d_model=case.d_model, nhead=case.nhead, num_encoder_layers=2, num_decoder_layers=2,
                dim_feedforward=4 * case.d_model, dropout=0.0, max_len=max(case.L, 5000),
                fused=provider == "fused=True")
    if "state" not in weights:
        weights["state"] = model.state_dict()
    model.load_state_dict(weights["state"])
    model = model.to(device=device, dtype=_dtype(device)).train()
    g = torch.Generator(device=device).manual_seed(0)
    src, tgt, labels = (torch.randint(1, case.vocab, (case.B, case.L), device=device, generator=g) for _ in range(3))
    return _step(model, lambda m: F.cross_entropy(m(src, tgt).float().flatten(0, 1), labels.flatten()))


def main(argv=None) -> int:
    with common.session(common.first_paragraph(__doc__), argv, 60, "toy sizes in fp32 on CPU; fastattn's modules run "
                        "their torch fallback there") as s:
        args, env, out_dir, timer, budget, gpu = s.args, s.env, s.out_dir, s.timer, s.budget, s.gpu
        rows = []
        for case in common.progress(grid(args.mode, gpu), NAME):
            row = case.to_json()
            base, fast = PROVIDERS[case.model]
            make = make_encoder_layer if case.model == "encoder_layer" else make_transformer
            weights: dict = {}  # the first model's initial state_dict, loaded into the second
            try:
                budget.check()
                row["results"] = {p: common.time_passes(lambda p=p: make(case, p, args.device, weights), ("step",),
                                                        timer).to_json() for p in (base, fast)}
            except Skip as e:
                row["results"] = common.skipped_row(str(e), (base, fast), ("step",))
            del weights
            common.free_memory(args.device)
            for res in row["results"].values():
                ms = res["ms"]["step"]
                res["tokens_per_s"] = case.B * case.L / (ms * 1e-3) if ms else None
            tb, tf = (row["results"][p]["tokens_per_s"] for p in (base, fast))
            row["ratio"] = tf / tb if tb and tf else None
            rows.append(row)
            common.report(NAME, args, env, [], [], rows, [], out_dir, partial=True)

        t = common.Table("training step tokens/s (fwd + bwd + AdamW; ratio = fastattn ÷ baseline)",
                         ["case", "baseline", "tokens/s", "fastattn", "tokens/s", "ratio", "ms (base / fast)"])
        for r in rows:
            base, fast = PROVIDERS[r["model"]]
            res = r["results"]
            t.add(r["case"], base, common.fmt(res[base]["tokens_per_s"]), fast, common.fmt(res[fast]["tokens_per_s"]),
                  common.fmt(r["ratio"], ".2f"), f"{common.fmt(res[base]['ms']['step'])} / "
                  f"{common.fmt(res[fast]['ms']['step'])}")
        pngs = []
        if not args.no_plots:
            panels = []
            for model, group in (("encoder_layer", lambda r: f"d{r['d_model']}" + (" causal" if r["causal"] else "")),
                                 ("transformer", lambda r: f"d{r['d_model']}")):
                series: dict = {}
                for r in rows:
                    if r["model"] == model:
                        for p in PROVIDERS[model]:
                            series.setdefault(f"{p} {group(r)}", []).append((r["L"], r["results"][p]["tokens_per_s"]))
                if series:
                    panels.append((model, series))
            if panels:
                png = common.plot_lines(out_dir / "transformer.png", f"training step tokens/s — {env['device']}, "
                                        f"torch {env['torch']}, {env['date'][:10]}", panels, "sequence length",
                                        "tokens/s")
                pngs = [png] if png else []
        notes = [" ".join(line.split()) for line in __doc__.split("\n\n")[1:2]]
        notes += common.notes_from_reasons(common.reasons_by_provider([r["results"] for r in rows]))
        common.report(NAME, args, env, [t], notes, rows, pngs, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
