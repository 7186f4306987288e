"""The dev evidence of a study as a Markdown table: one row per run (meta.json + metrics.jsonl, as
bench/plot_study.py reads them), its dev scores at every evaluation, and the step that the
selection rule picks: the highest mean of STS-B dev (cosine Spearman) and SciFactDev (nDCG@10),
so that neither task kind decides alone.

    python bench/study_table.py bench/study/gemma3-270m/*
"""
import argparse
from pathlib import Path

from plot_study import label, read_run

TASKS = ("STSBenchmarkDev", "SciFactDev")


def dev_rows(run) -> list:
    """[(step, STS-B dev, SciFactDev, mean)] at the steps where both were scored."""
    sts, sci = (dict(run["curves"].get(t, [])) for t in TASKS)
    return [(s, sts[s], sci[s], (sts[s] + sci[s]) / 2) for s in sorted(sts) if s in sci]


def best(run):
    rows = dev_rows(run)
    return max(rows, key=lambda r: r[3]) if rows else None


def table(runs) -> str:
    lines = ["| run | steps | dev by step (STS-B / SciFactDev) | best step: STS-B, SciFactDev, mean |",
             "|---|---|---|---|"]
    for run in runs:
        rows, top = dev_rows(run), best(run)
        if top is None:
            continue
        curve = ", ".join(f"{s}: {a:.3f} / {b:.3f}" for s, a, b, _ in rows)
        lines.append(f"| {label(run)} | {run['meta'].get('total_steps', '?')} | {curve} | "
                     f"**{top[0]}**: {top[1]:.4f}, {top[2]:.4f}, {top[3]:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (meta.json + metrics.jsonl)")
    args = p.parse_args(argv)
    print(table([read_run(Path(r)) for r in args.runs]))


if __name__ == "__main__":
    main()
