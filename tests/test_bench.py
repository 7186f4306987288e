"""bench/gpu_check.py --dry-run: every section of the GPU check runs end to end on CPU with tiny
shapes, and leaves its table and logs (the real run happens once, on a GPU machine).

Needs transformers (the side-by-side reference); skipped without it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("gpu_check.log", "results.json", "summary.md", "env.txt", "pytest_cuda.log"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "| check | setting | ours | transformers |" in summary and "FAILED" not in summary, summary
    for row in ("train tokens/s", "train MFU", "train peak GB", "encode texts/s", "bf16 vs fp32 cosine",
                "CUDA tests"):
        assert f"| {row} |" in summary, row
    results = json.loads((out / "results.json").read_text())
    small = results["train Qwen2.5-0.5B (tiny)"]
    assert {"ours ckpt off", "ours ckpt on", "transformers ckpt off", "transformers ckpt on"} <= set(small)
    assert all(r["tokens_per_s"] > 0 and r["loss"] == r["loss"] for r in small.values())
    assert results["encode"]["min_cosine"] > 0.999  # same weights, same tokens on both sides
    assert all(r["min"] >= 0.999 for r in results["bf16 vs fp32"].values())
    assert "| check | setting | ours | transformers |" in res.stdout  # the table is printed at the end
