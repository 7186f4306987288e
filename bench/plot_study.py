"""Dev curves of training runs: score against optimizer step, one line per run, one panel per dev
task (the eval_<task> keys that `t2t.py train --eval-every` writes to metrics.jsonl).

Each run is a folder with meta.json and metrics.jsonl (a run directory, or the copy of those two
files kept under bench/study/). A line is labelled from meta.json: stage, attention/pooling, lr,
tau (stage 2), seed. An optional JSON of untrained scores ({"bidirectional/mean": {"STSBenchmarkDev":
0.28, ...}, ...}) puts each configuration's untrained score at step 0; --starts STAGE1_RUNS puts a
stage-2 run's step 0 at the last scores of the stage-1 run it was trained from.

    python bench/plot_study.py bench/study/smollm2/* --untrained bench/study/smollm2_untrained.json \
        --title "SmolLM2-135M-Instruct, stage 1" --out bench/figures/smollm2_dev.png

Needs matplotlib (a bench-only dependency, in requirements-test.txt).
"""
import argparse
import json
from pathlib import Path

TASK_LABELS = {"STSBenchmarkDev": "STS-B dev (cosine Spearman)", "SciFactDev": "SciFact train-query dev (nDCG@10)"}


def read_run(folder: Path) -> dict:
    """meta.json and metrics.jsonl of a run -> its label settings and {task: [(step, score)]}."""
    meta = json.loads((folder / "meta.json").read_text())
    curves = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith("eval_"):
                curves.setdefault(key[len("eval_"):], []).append((row["step"], value))
    return dict(meta=meta, curves=curves, name=folder.name)


def label(run, starts=()) -> str:
    args, emb = run["meta"]["args"], run["meta"]["embedding"]
    parts = [f"stage {args['stage']}", f"{emb['attention']}/{emb['pooling']}", f"lr {args['lr']:g}"]
    if args["stage"] == 2:
        parts.append(f"tau {args['tau']:g}")
        start = stage1_of(run, starts)
        if start is not None:
            steps = start["meta"].get("total_steps", start["meta"]["args"].get("max_steps"))
            parts.append(f"from lr {start['meta']['args']['lr']:g} x {steps} steps")
    if args.get("seed", 0):
        parts.append(f"seed {args['seed']}")
    return ", ".join(parts)


def config(run) -> str:
    emb = run["meta"]["embedding"]
    return f"{emb['attention']}/{emb['pooling']}"


def stage1_of(run, starts):
    """The stage-1 run a stage-2 run was trained from: the one among `starts` whose meta.json names
    the --out that the stage-2 run's meta.json names as its init (None if not given)."""
    for s in starts:
        if s["meta"]["args"].get("out") and run["meta"].get("init") and \
                Path(s["meta"]["args"]["out"]).resolve() == Path(run["meta"]["init"]).resolve():
            return s
    return None


def stage1_end(run, starts, task):
    """A stage-2 run's step 0: the last score of the stage-1 run it was trained from."""
    start = stage1_of(run, starts)
    points = start["curves"].get(task) if start is not None else None
    return points[-1][1] if points else None


def plot(runs, untrained, title, out, starts=()):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in runs for t in r["curves"]}, key=lambda t: list(TASK_LABELS).index(t)
                   if t in TASK_LABELS else len(TASK_LABELS))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    styles = {"bidirectional/mean": "-", "causal/last": "--", "causal/mean": ":", "bidirectional/last": "-."}
    for ax, task in zip(axes[0], tasks):
        for run in runs:
            points = run["curves"].get(task)
            if not points:
                continue
            start = untrained.get(config(run), {}).get(task) if run["meta"]["args"]["stage"] == 1 else \
                stage1_end(run, starts, task)
            if start is not None:
                points = [(0, start)] + points
            steps, scores = zip(*points)
            ax.plot(steps, scores, styles.get(config(run), "-"), marker="o", markersize=3, label=label(run, starts))
        ax.set_title(TASK_LABELS.get(task, task))
        ax.set_xlabel("optimizer step (32 texts each)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"{out}: {len(runs)} runs, tasks {', '.join(tasks)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (meta.json + metrics.jsonl)")
    p.add_argument("--untrained", default=None, help="JSON of untrained dev scores per attention/pooling")
    p.add_argument("--starts", nargs="*", default=[],
                   help="stage-1 run folders: each stage-2 run starts at step 0 from its init's last scores")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    runs = [read_run(Path(r)) for r in args.runs]
    untrained = json.loads(Path(args.untrained).read_text()) if args.untrained else {}
    plot(runs, untrained, args.title, args.out, [read_run(Path(r)) for r in args.starts])


if __name__ == "__main__":
    main()
