"""The dev evidence of a study as a Markdown table: one row per run (meta.json + metrics.jsonl, as
bench/plot_study.py reads them), its dev scores at every evaluation, and the step that the
selection rule picks: the highest mean of STS-B dev (cosine Spearman) and SciFactDev (nDCG@10),
so that neither task kind decides alone.

    python bench/study_table.py bench/study/gemma3-270m/*
    python bench/study_table.py --test bench/study/test/gemma3-270m/*

--test: the test table instead, one row per folder of `evaluate.py --output` result files (MTEB
layout), with the command that made them (command.txt in the folder) and the scoring time.
"""
import argparse
import json
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


TEST_TASKS = ("STSBenchmark", "SciFact")


def test_row(folder: Path) -> dict:
    """{task: (main score, seconds)} from the result files under folder, plus its command."""
    row = {"label": folder.name, "command": (folder / "command.txt").read_text().strip()
           if (folder / "command.txt").is_file() else ""}
    for task in TEST_TASKS:
        files = sorted(folder.rglob(f"{task}.json"))
        if len(files) > 1:
            raise SystemExit(f"{folder}: {len(files)} result files for {task}; one model a folder")
        if files:
            r = json.loads(files[0].read_text())
            row[task] = (r["scores"]["test"][0]["main_score"], r["evaluation_time"])
    return row


def test_table(folders) -> str:
    lines = ["| row | STS-B test | SciFact nDCG@10 | scoring time | command |", "|---|---|---|---|---|"]
    for row in map(test_row, folders):
        cells = [f"{row[t][0]:.4f}" if t in row else "" for t in TEST_TASKS]
        secs = sum(row[t][1] for t in TEST_TASKS if t in row)
        lines.append(f"| {row['label']} | {cells[0]} | {cells[1]} | {secs / 60:.1f} min | `{row['command']}` |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (meta.json + metrics.jsonl), or result folders with --test")
    p.add_argument("--test", action="store_true", help="the runs are evaluate.py --output folders: the test table")
    args = p.parse_args(argv)
    print(test_table([Path(r) for r in args.runs]) if args.test else table([read_run(Path(r)) for r in args.runs]))


if __name__ == "__main__":
    main()
