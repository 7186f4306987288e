"""Untrained dev scores of a model in each embedding configuration, as `t2t.py train --eval-every`
scores a run (the same dev tasks, max length, autocast), so that dev curves start at step 0.

    python bench/study_untrained.py --model smollm2 --precision bf16 --out bench/study/smollm2_untrained.json

Writes {"attention/pooling": {task: main score, ...}, ...}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate as E  # noqa: E402
import model as M  # noqa: E402

CONFIGS = [("bidirectional", "mean"), ("causal", "last"), ("causal", "mean"), ("bidirectional", "last")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="STSBenchmarkDev,SciFactDev")
    p.add_argument("--max-length", type=int, default=128, help="as the training runs score dev")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model, tok = M.load(args.model)  # a path or a model name (smollm2, gemma3-270m)
    scores = {}
    for attention, pooling in CONFIGS:
        emb = M.Embedder(model, tok, pooling, attention == "causal", args.max_length)  # last: PromptEOL
        key = f"{attention}/{pooling}"
        for task in args.tasks.split(","):
            t0 = time.time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                score = E.evaluate_task(emb, task, batch_size=64)["main_score"]
            scores.setdefault(key, {})[task] = round(score, 6)
            print(f"{key} {task}: {score:.4f} ({time.time() - t0:.0f}s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(scores, indent=1) + "\n")


if __name__ == "__main__":
    main()
