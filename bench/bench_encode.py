"""Encoding throughput: Embedder.encode vs a naive transformers loop, on SciFact documents.

    python bench/bench_encode.py [--threads 1] [--n 500] [--repeats 3] [--batch-size 32] [--max-length 512]

Corpus: the first --n documents of data/scifact/corpus.jsonl, title + " " + text (lengths are
skewed: with Mistral's tokenizer, 109 to 512+ tokens, median ~350). Two models: a random Llama
(bench/common.py's shape, vocabulary 32000) with Mistral-7B-Instruct-v0.2's tokenizer (from
tests/fixtures), and the bundled stories260K (its 512-piece tokenizer makes nearly every document
longer than 512 tokens, so truncation leaves no length skew: a control). Ours: Embedder.encode
(length-sorted batches, mean pooling, bidirectional). Naive: transformers' tokenizer and model on
fixed batches in input order, padding to each batch's longest, the same pooling and attention.
Texts/s include tokenization on both sides; medians of runs alternating ours/naive in one
process. The embeddings of both sides are compared (cosine, max abs difference).

Dimensions: N texts, B batch, T tokens, D hidden.
Not included: GPU (bench/gpu_check.py), prompts and last-token pooling.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import model  # noqa: E402


def random_llama_with_mistral_tokenizer(path):
    import hf_reference
    C.quiet_transformers()
    hf_reference.save_random_checkpoint(path, C.BENCH_LLAMA, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(C.MISTRAL_TOKENIZER / name, path / name)
    return path


def naive_encoder(path, max_length):
    """transformers' tokenizer + model in input order: what a first script would do."""
    from transformers import AutoTokenizer
    import hf_reference
    C.quiet_transformers()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # Llama/Mistral have none; the mask hides it anyway
    hf = hf_reference.load_hf(path, attn_implementation="sdpa")

    @torch.no_grad()
    def encode(texts, batch_size):
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append(C.hf_mean_embed(hf, enc["input_ids"], enc["attention_mask"]).numpy())
        return np.concatenate(out)
    return encode


def compare(path, texts, args):
    ours = model.Embedder.from_pretrained(path, "mean", "bidirectional", args.max_length)
    naive = naive_encoder(path, args.max_length)
    times = {"ours": [], "naive": []}
    runs = {"ours": lambda: ours.encode(texts, batch_size=args.batch_size),
            "naive": lambda: naive(texts, args.batch_size)}
    runs["ours"](), runs["naive"]()  # warm-up (allocator, tokenizer caches)
    out = {}
    for i in range(args.repeats):
        for side in ("ours", "naive") if i % 2 == 0 else ("naive", "ours"):
            t0 = time.perf_counter()
            out[side] = runs[side]()
            times[side].append(time.perf_counter() - t0)
    a, b = out["ours"], out["naive"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lengths = [len(x) for x in ours.tokenizer.encode(texts, max_length=args.max_length)]
    return dict(ours=len(texts) / C.median(times["ours"]), naive=len(texts) / C.median(times["naive"]),
                cos_min=float(cos.min()), max_abs=float(np.abs(a - b).max()),
                tokens=sum(lengths), full=sum(n == args.max_length for n in lengths))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a busy machine)")
    p.add_argument("--n", type=int, default=500, help="SciFact documents")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512, help="tokens per text, BOS included")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    texts = C.scifact_texts(args.n)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"random Llama (BENCH_LLAMA), Mistral tokenizer":
                  random_llama_with_mistral_tokenizer(Path(tmp) / "llama"),
                  "stories260K (control: no skew)": C.STORIES}
        for name, path in models.items():
            r = results[name] = compare(path, texts, args)
            rows.append([name, f"{r['ours']:.1f}", f"{r['naive']:.1f}", f"{r['ours'] / r['naive']:.2f}",
                         f"{r['cos_min']:.6f}", f"{r['max_abs']:.1e}", f"{r['tokens']} ({r['full']} at max)"])
    skewed = next(iter(results.values()))
    ratio = skewed["ours"] / skewed["naive"]
    notes = [f"{args.n} SciFact documents, batch {args.batch_size}, max length {args.max_length}, fp32, "
             f"median of {args.repeats} runs per side (alternating, after one warm-up each).",
             f"Target: >= 1.5x on the skewed corpus: {'met' if ratio >= 1.5 else 'NOT met'} ({ratio:.2f}x)."]
    C.report("Encoding throughput (CPU)", ["model", "ours texts/s", "naive texts/s", "ratio", "min cosine",
                                           "max abs diff", "tokens (texts at max length)"], rows, notes,
             write=not args.no_write)


if __name__ == "__main__":
    main()
