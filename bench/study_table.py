"""The dev evidence of a study as a Markdown table: one row per run (meta.json + metrics.jsonl, as
bench/plot_study.py reads them), its dev scores at every evaluation, and the step that the
selection rule picks: the highest mean of STS-B dev (cosine Spearman) and SciFactDev (nDCG@10),
so that neither task kind decides alone.

    python bench/study_table.py bench/study/gemma3-270m/*
    python bench/study_table.py --test bench/study/test/gemma3-270m/*
    python bench/study_table.py --seeds RUN_SEED0 RUN_SEED1 RUN_SEED2 [...]
    python bench/study_table.py --test --seeds bench/study/test/gemma3-270m/*

--test: the test table instead, one row per folder of `evaluate.py --output` result files (MTEB
layout), with the command that made them (command.txt in the folder) and the scoring time.
--seeds: one row per setting, over its seeds: the mean, the sample standard deviation and the range
of each score. Dev: the runs' last evaluation, runs grouped by their label without the seed and by
their step count (pass the runs of one setting's seeds: two stage-2 runs from different stage-1
runs have the same label). Test: folders grouped by their name without a `_seedN` suffix (the
folder without one is seed 0).
"""
import argparse
import json
import re
import statistics
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


def spread(values) -> str:
    """'mean ± sample sd (min-max)', or the single value."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def seed_table(runs) -> str:
    """Dev scores at each run's last evaluation, over the seeds of each setting."""
    groups = {}
    for run in runs:
        rows = dev_rows(run)
        if rows:
            key = (re.sub(r", seed \d+$", "", label(run)), run["meta"].get("total_steps", "?"))
            groups.setdefault(key, []).append((run["meta"]["args"].get("seed", 0), rows[-1]))
    lines = ["| setting | steps | seeds | STS-B dev | SciFactDev | mean of the two |", "|---|---|---|---|---|---|"]
    for (name, steps), got in groups.items():
        seeds = ", ".join(str(seed) for seed, _ in sorted(got))
        cols = [spread([r[i] for _, r in got]) for i in (1, 2, 3)]
        lines.append(f"| {name} | {steps} | {seeds} | {cols[0]} | {cols[1]} | {cols[2]} |")
    return "\n".join(lines)


def test_seed_table(folders) -> str:
    """Test scores over the seeds of each row (folders named ROW and ROW_seedN)."""
    groups = {}
    for folder in folders:
        m = re.fullmatch(r"(.*?)(?:_seed(\d+))?", folder.name)
        groups.setdefault(m.group(1), []).append((int(m.group(2) or 0), test_row(folder)))
    lines = ["| row | seeds | STS-B test | SciFact nDCG@10 |", "|---|---|---|---|"]
    for name, got in groups.items():
        cells = []
        for task in TEST_TASKS:
            values = [row[task][0] for _, row in sorted(got, key=lambda g: g[0]) if task in row]
            cells.append(f"{spread(values)} (n {len(values)})" if values else "")
        lines.append(f"| {name} | {', '.join(str(seed) for seed, _ in sorted(got, key=lambda g: g[0]))} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (meta.json + metrics.jsonl), or result folders with --test")
    p.add_argument("--test", action="store_true", help="the runs are evaluate.py --output folders: the test table")
    p.add_argument("--seeds", action="store_true", help="mean, spread and range over each setting's seeds")
    args = p.parse_args(argv)
    folders = [Path(r) for r in args.runs]
    if args.test:
        print(test_seed_table(folders) if args.seeds else test_table(folders))
    else:
        runs = [read_run(f) for f in folders]
        print(seed_table(runs) if args.seeds else table(runs))


if __name__ == "__main__":
    main()
