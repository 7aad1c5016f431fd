"""Render a `bench_quality.py --json` file: the table with 95% intervals and a plot.

Works on a partial file (a benchmark still running or cut short): every variant is
summarised over the seeds it finished, and differences to the baseline are paired over
the seeds both finished.

    python benchmarks/render_quality.py bench.json --plot benchmarks/bccd_quality.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pisa.core.stats import paired, summarize  # noqa: E402

LABELS = {
    "baseline": "baseline (random, PISA off)",
    "pisa": "PISA, paper defaults",
    "isr_carl": "ISR-P + CARL (random sampler)",
    "best": "study best",
}


def finished(runs: list[dict], metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        value = (r.get("metrics") or {}).get(metric)
        if r.get("status") == "FINISHED" and value is not None:
            out.setdefault(r["variant"], {})[int(r["seed"])] = float(value)
    return out


def _f(v: float | None, signed: bool = False, scale: float = 1.0) -> str:
    if v is None:
        return "-"
    return f"{v * scale:+.3f}" if signed else f"{v * scale:.3f}"


def table(data: dict, metric: str) -> str:
    runs = data["runs"]
    values = finished(runs, metric)
    order = [v for v in data["meta"].get("variants", {}) if v in values] or sorted(values)
    base = values.get("baseline", {})
    lines = [
        f"| variant | seeds | {metric} mean | std | 95% CI | per seed | paired diff vs baseline "
        f"| 95% CI of diff | wins |",
        "|---|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for v in order:
        vals = values[v]
        s = summarize([vals[k] for k in sorted(vals)])
        ci = f"[{_f(s.ci_low)}, {_f(s.ci_high)}]" if s.ci_low is not None else "-"
        per_seed = " / ".join(f"{k}: {vals[k]:.3f}" for k in sorted(vals))
        if v == "baseline" or not base:
            diff, dci, wins = "-", "-", "-"
        else:
            p = paired(vals, base)
            d = p.difference
            diff = _f(d.mean, signed=True)
            dci = f"[{_f(d.ci_low, True)}, {_f(d.ci_high, True)}]" if d.ci_low is not None else "-"
            wins = f"{p.wins} of {len(p.seeds)}"
        lines.append(
            f"| {LABELS.get(v, v)} | {s.n} | {_f(s.mean)} | {_f(s.std)} | {ci} | {per_seed} | {diff} | {dci} | {wins} |"
        )
    failed = [r for r in runs if r.get("status") != "FINISHED"]
    for r in failed:
        lines.append(f"\nFAILED: {r['variant']} seed {r['seed']}: {r.get('error')}")
    return "\n".join(lines)


def plot(data: dict, metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = finished(data["runs"], metric)
    order = [v for v in data["meta"].get("variants", {}) if v in values] or sorted(values)
    seeds = sorted({s for v in values.values() for s in v})
    cmap = plt.get_cmap("tab10")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.boxplot([[values[v][s] for s in sorted(values[v])] for v in order], widths=0.5, showmeans=True)
    for i, v in enumerate(order, 1):
        for j, s in enumerate(seeds):
            if s in values[v]:
                ax1.scatter(
                    i + (j - (len(seeds) - 1) / 2) * 0.06,
                    values[v][s],
                    color=cmap(j % 10),
                    s=24,
                    zorder=3,
                    label=f"seed {s}" if i == 1 else None,
                )
    ax1.set_xticks(range(1, len(order) + 1), [LABELS.get(v, v) for v in order], rotation=12, ha="right", fontsize=8)
    ax1.set_ylabel(f"final-epoch val {metric}")
    ax1.set_title(f"BCCD val {metric} per seed")
    ax1.legend(fontsize=7)
    for i, v in enumerate(order):
        for r in data["runs"]:
            hist = (r.get("history") or {}).get(metric)
            if r["variant"] == v and r.get("status") == "FINISHED" and hist:
                ax2.plot(
                    range(1, len(hist) + 1),
                    hist,
                    color=cmap(i % 10),
                    alpha=0.7,
                    label=LABELS.get(v, v) if r["seed"] == min(values[v]) else None,
                )
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"val {metric}")
    ax2.set_title("learning curves (one line per seed)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the file bench_quality.py --json wrote")
    parser.add_argument("--metric", action="append", help="metric(s) to tabulate (default bbox_mAP, bbox_mAP_50)")
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    args = parser.parse_args()
    if not args.json.exists():
        print(f"error: {args.json}: no such file", file=sys.stderr)
        return 2
    data = json.loads(args.json.read_text())
    if isinstance(data, list):  # files written before the meta block existed
        data = {"meta": {}, "runs": data}
    meta = data["meta"]
    print(
        f"{len(data['runs'])} trainings; started {meta.get('started')}, finished {meta.get('finished', '-')}; "
        f"commit {meta.get('commit')}; {meta.get('cpus')} x {meta.get('cpu')} ({meta.get('host')}), "
        f"torch {meta.get('torch')}"
    )
    for metric in args.metric or ["bbox_mAP", "bbox_mAP_50"]:
        print()
        print(table(data, metric))
    if args.plot:
        print(f"\nwrote {plot(data, 'bbox_mAP', args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
