"""Write ``SUMMARY.md`` from the benchmark JSON files of one results folder: device, versions, date, the
tables, the notes and links to the PNG plots.

    python benchmarks/summary.py [--out DIR]   (default: benchmarks/results/<this machine's gpu-name or cpu>)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import torch  # noqa: E402

import common  # noqa: E402

ORDER = ("attention", "softmax", "layer_norm", "transformer", "memory", "context_parallel")


def _load(path: Path):
    """The JSON of ``path``, or None (said) when it does not parse: one damaged file must not lose the others."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"skipping {path}: {e}")
        return None


def summarize(out_dir: Path) -> Path:
    found = {p.stem: _load(p) for p in sorted(out_dir.glob("*.json"))}
    found = {k: v for k, v in found.items() if isinstance(v, dict) and "benchmark" in v}
    if not found:
        raise SystemExit(f"no benchmark JSON files in {out_dir}")
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    lines = [f"# fastattn benchmarks — {found[names[0]]['env']['device']}", ""]
    lines += ["| benchmark | device | torch | triton | CUDA | date | autotune | grid | commit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        e = found[n]["env"]
        lines.append(f"| [{n}](#{n}) | {e['device']} | {e['torch']} | {e['triton']} | {e['cuda']} | {e['date']} | "
                     f"{'on' if e['autotune'] else 'off'} | {e['mode']} | {e.get('git_commit')} |")
    lines += ["", f"Timing: {found[names[0]]['env']['timing']}.", ""]
    for n in names:
        d = found[n]
        lines += [f"## {n}" + (" (partial: the run stopped early; its rows so far)" if d.get("partial") else ""), ""]
        lines += [f"![{p}]({p})" for p in d.get("plots", [])]
        lines += [""] if d.get("plots") else []
        for t in d.get("tables", []):
            lines += [common.Table.from_json(t).markdown(), ""]
        if d.get("notes"):
            lines += ["Notes:", ""] + [f"- {x}" for x in d["notes"]] + [""]
    path = out_dir / "SUMMARY.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", type=Path, default=None, help="results folder holding the JSON files")
    args = p.parse_args(list(argv) if argv is not None else None)
    out = args.out or common.default_results_dir("cuda" if torch.cuda.is_available() else "cpu")
    print(f"wrote {summarize(Path(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
