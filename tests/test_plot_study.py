"""bench/plot_study.py draws the dev curves from runs' metrics: every eval_<task> key of
metrics.jsonl becomes a point of that task's panel, labelled from meta.json (needs matplotlib,
a bench-only dependency; skipped without it)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import plot_study  # noqa: E402


def fake_run(folder: Path, stage, attention, pooling, lr, scores, tau=1e-4, seed=0):
    folder.mkdir(parents=True)
    meta = dict(args=dict(stage=stage, lr=lr, tau=tau, seed=seed, max_steps=max(scores)),
                embedding=dict(attention=attention, pooling=pooling, prompt=None, max_length=128))
    (folder / "meta.json").write_text(json.dumps(meta))
    rows = []
    for step, (sts, ret) in scores.items():
        rows.append(dict(step=step - 1, loss=1.0))  # a step without evaluation: no point
        rows.append(dict(step=step, loss=1.0, eval_STSBenchmarkDev=sts, eval_SciFactDev=ret))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_curves_come_from_the_eval_keys_and_labels_from_meta(tmp_path):
    a = fake_run(tmp_path / "a", 1, "bidirectional", "mean", 3e-4, {50: (0.6, 0.4), 100: (0.7, 0.5)})
    b = fake_run(tmp_path / "b", 2, "causal", "last", 3e-5, {10: (0.75, 0.45)}, tau=1e-2, seed=1)
    run_a, run_b = plot_study.read_run(a), plot_study.read_run(b)
    assert run_a["curves"] == {"STSBenchmarkDev": [(50, 0.6), (100, 0.7)], "SciFactDev": [(50, 0.4), (100, 0.5)]}
    assert plot_study.label(run_a) == "stage 1, bidirectional/mean, lr 0.0003"
    assert plot_study.label(run_b) == "stage 2, causal/last, lr 3e-05, tau 0.01, seed 1"


def test_a_stage2_curve_starts_from_its_stage1_run(tmp_path):
    s1 = fake_run(tmp_path / "s1", 1, "causal", "last", 1e-4, {20: (0.70, 0.60), 60: (0.77, 0.67)})
    s2 = fake_run(tmp_path / "s2", 2, "causal", "last", 3e-5, {20: (0.79, 0.72)})
    other = fake_run(tmp_path / "other", 1, "causal", "last", 1e-4, {60: (0.5, 0.5)})
    for folder, out, init in [(s1, "/runs/a", None), (other, "/runs/b", None), (s2, "/runs/c", "/runs/a")]:
        meta = json.loads((folder / "meta.json").read_text())
        meta["args"]["out"], meta["init"] = out, init
        (folder / "meta.json").write_text(json.dumps(meta))
    runs = [plot_study.read_run(f) for f in (s1, other, s2)]
    assert plot_study.stage1_end(runs[2], runs[:2], "STSBenchmarkDev") == 0.77
    assert plot_study.stage1_end(runs[2], runs[:2], "SciFactDev") == 0.67
    assert plot_study.stage1_end(runs[2], runs[1:2], "SciFactDev") is None  # not its init
    # two stage-2 runs of the same settings from different stage-1 runs get different labels
    assert plot_study.label(runs[2], runs[:2]) == "stage 2, causal/last, lr 3e-05, tau 0.0001, from lr 0.0001 x 60 steps"
    assert plot_study.label(runs[2], runs[1:2]) == "stage 2, causal/last, lr 3e-05, tau 0.0001"


def test_the_picture_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path / "a", 1, "bidirectional", "mean", 3e-4, {50: (0.6, 0.4), 100: (0.7, 0.5)})
    untrained = tmp_path / "u.json"
    untrained.write_text(json.dumps({"bidirectional/mean": {"STSBenchmarkDev": 0.3, "SciFactDev": 0.2}}))
    out = tmp_path / "fig" / "dev.png"
    plot_study.main([str(a), "--untrained", str(untrained), "--title", "t", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_test_table_reads_evaluate_result_files(tmp_path):
    """bench/study_table.py --test: one row per evaluate.py --output folder, main scores and scoring
    time from the MTEB-layout files that evaluate.py writes, and the folder's command."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    import study_table
    row = tmp_path / "stage 1"
    evaluate.write_mteb_result("STSBenchmark", {"main_score": 0.71234}, row, "text2token/x", "abc", evaluation_time=60)
    evaluate.write_mteb_result("SciFact", {"main_score": 0.4}, row, "text2token/x", "abc", evaluation_time=540)
    (row / "command.txt").write_text("python evaluate.py --model x\n")
    only_sts = tmp_path / "untrained"
    evaluate.write_mteb_result("STSBenchmark", {"main_score": 0.5}, only_sts, "local/m", "def", evaluation_time=30)
    lines = study_table.test_table([row, only_sts]).splitlines()
    assert lines[2] == "| stage 1 | 0.7123 | 0.4000 | 10.0 min | `python evaluate.py --model x` |"
    assert lines[3] == "| untrained | 0.5000 |  | 0.5 min | `` |"


def test_the_seed_tables_give_mean_spread_and_range(tmp_path):
    """--seeds: dev at each run's last evaluation and test per row, over the seeds of a setting, with
    the sample standard deviation worked by hand; settings that differ only by step count stay apart."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    import study_table
    runs = [fake_run(tmp_path / f"s{seed}", 1, "causal", "last", 1e-4, {30: (0.1, 0.1), 60: (sts, ret)}, seed=seed)
            for seed, sts, ret in [(0, 0.70, 0.60), (1, 0.72, 0.62), (2, 0.74, 0.67)]]
    longer = fake_run(tmp_path / "long", 1, "causal", "last", 1e-4, {100: (0.5, 0.5)})
    for folder, steps in [(r, 60) for r in runs] + [(longer, 100)]:
        meta = json.loads((folder / "meta.json").read_text())
        meta["total_steps"] = steps
        (folder / "meta.json").write_text(json.dumps(meta))
    lines = study_table.seed_table([plot_study.read_run(f) for f in runs + [longer]]).splitlines()
    # STS-B: mean 0.72, sd sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02; SciFactDev: mean 0.63, deviations
    # -0.03, -0.01, 0.04: sd sqrt(0.0026 / 2) = 0.03606; mean of the two: 0.65, 0.67, 0.705
    assert lines[2] == ("| stage 1, causal/last, lr 0.0001 | 60 | 0, 1, 2 | 0.7200 ± 0.0200 (0.7000-0.7400) | "
                        "0.6300 ± 0.0361 (0.6000-0.6700) | 0.6750 ± 0.0278 (0.6500-0.7050) |")
    assert lines[3] == "| stage 1, causal/last, lr 0.0001 | 100 | 0 | 0.5000 | 0.5000 | 0.5000 |"
    folders = []
    for name, sts, sci in [("stage2", 0.73, 0.50), ("stage2_seed1", 0.71, None), ("stage2_seed2", 0.72, 0.46),
                           ("untrained", 0.64, None)]:
        evaluate.write_mteb_result("STSBenchmark", {"main_score": sts}, tmp_path / "t" / name, "local/m", "r")
        if sci is not None:
            evaluate.write_mteb_result("SciFact", {"main_score": sci}, tmp_path / "t" / name, "local/m", "r")
        folders.append(tmp_path / "t" / name)
    lines = study_table.test_seed_table(folders).splitlines()
    assert lines[2] == ("| stage2 | 0, 1, 2 | 0.7200 ± 0.0100 (0.7100-0.7300) (n 3) | "
                        "0.4800 ± 0.0283 (0.4600-0.5000) (n 2) |")
    assert lines[3] == "| untrained | 0 | 0.6400 (n 1) |  |"
