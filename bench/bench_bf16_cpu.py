"""bf16 vs fp32 on CPU: encoding and training speed, embedding agreement, STS-B dev scores.

    python bench/bench_bf16_cpu.py [--model smollm2] [--docs 200] [--steps 8] [--sts-pairs 1500]
    python bench/bench_bf16_cpu.py --quick      (stories260K, tiny sizes: checks that it runs)

On one CPU thread, both dtypes in one process, alternating run by run after a warm-up:
  - encoding: Embedder.encode of SciFact documents with the weights in fp32 and in bf16
    (evaluate.py --dtype float32|bfloat16), texts/s, and per text the cosine of the two
    embeddings (min and mean);
  - training: the stage-1 step of t2t.py train (bench/common.py Stage1Steps) with --precision
    fp32 and bf16 (autocast, frozen bf16 base, fp32 LoRA), and bf16 with the attention left in
    bf16 (model.attend without its fp32 cast) to show what that cast is worth;
  - attention alone: SDPA forward + backward at B=32, H=9, T=32, hd=64 (SmolLM2's heads, a
    Wikipedia-sentence length) in fp32, bf16, and bf16 inputs cast to fp32;
  - STS-B dev cosine Spearman of the model in both dtypes for causal/mean, causal/last with
    PromptEOL, bidirectional/mean (the untrained model: what --dtype changes, nothing else).
Whether this CPU has bf16 units (evaluate.cpu_has_bf16) is printed with the table: without them
torch emulates bf16 and it is slower than fp32.

Dimensions: B batch, H heads, T tokens, hd head dim.
Not included: fp16 (CPU training refuses it), CUDA (bench/gpu_check.py).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import evaluate as E  # noqa: E402
import model as M  # noqa: E402

STS_DEV = C.ROOT / "data" / "stsbenchmark" / "sts-dev.csv"
SETTINGS = (("causal", "mean"), ("causal", "last"), ("bidirectional", "mean"))  # attention, pooling
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def encoding(model, texts, batch_size, max_length, repeats):
    embs = {k: M.Embedder.from_pretrained(model, "mean", "bidirectional", max_length, dtype=d) for k, d in DTYPES.items()}
    med, out = C.alternate({k: (lambda e=e: e.encode(texts, batch_size)) for k, e in embs.items()}, repeats)
    a, b = out["fp32"], out["bf16"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {k: len(texts) / v for k, v in med.items()}, cos


def fp32_free_attend(q, k, v, mask):
    """model.attend without its fp32 cast: the attention of bf16 training runs in bf16."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def training(argv, steps):
    """Median ms/step of fp32, bf16 and bf16 with bf16 attention, alternating on the same batches."""
    sides = {"fp32": C.Stage1Steps(argv + ["--precision", "fp32"]),
             "bf16": C.Stage1Steps(argv + ["--precision", "bf16"]),
             "bf16, attention in bf16": C.Stage1Steps(argv + ["--precision", "bf16"])}
    real_attend = M.attend
    times, losses = {k: [] for k in sides}, {k: [] for k in sides}
    for position in range(steps + 1):
        names = list(sides) if position % 2 == 0 else list(sides)[::-1]
        for name in names:
            M.attend = fp32_free_attend if name.endswith("in bf16") else real_attend
            try:
                t = time.perf_counter()
                loss, _ = sides[name].step(position)
                if position > 0:  # step 0 is the warm-up
                    times[name].append(time.perf_counter() - t)
                    losses[name].append(loss)
            finally:
                M.attend = real_attend
    return {k: C.median(v) * 1e3 for k, v in times.items()}, losses


def sdpa_step(dtype, cast, B=32, H=9, T=32, hd=64, repeats=20):
    """Median ms of one SDPA forward + backward (key-padding mask, half the rows padded to T/2)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(B, H, T, hd, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[::2, ..., T // 2:] = False

    def run():
        args = (q.float(), k.float(), v.float()) if cast else (q, k, v)
        F.scaled_dot_product_attention(*args, attn_mask=mask).to(dtype).sum().backward()
    med, _ = C.alternate({"sdpa": run}, repeats)
    return med["sdpa"] * 1e3


def sts_scores(model, sts_file, max_length):
    """{(attention, pooling): {dtype: cosine Spearman}} on the STS file."""
    out = {}
    for attention, pooling in SETTINGS:
        for name, dtype in DTYPES.items():
            emb = M.Embedder.from_pretrained(model, pooling, attention, max_length, dtype=dtype)
            out.setdefault((attention, pooling), {})[name] = E.evaluate_sts(emb, sts_file, batch_size=32)["cosine_spearman"]
        print(f"STS {attention}/{pooling}: {out[(attention, pooling)]}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="model name, GGUF file or HF folder")
    p.add_argument("--docs", type=int, default=200, help="SciFact documents encoded")
    p.add_argument("--max-length", type=int, default=256, help="encoding: tokens per document")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed encoding runs per dtype")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--texts", type=int, default=2048, help="Wikipedia sentences the training batches come from")
    p.add_argument("--sts-pairs", type=int, default=1500, help="STS-B dev pairs scored (1500 = all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="stories260K, tiny sizes: checks that it runs")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.model, args.docs, args.max_length, args.repeats, args.steps = str(C.STORIES), 16, 64, 1, 2
        args.texts, args.sts_pairs, args.batch_size, args.no_write = 128, 40, 16, True
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sts_file = Path(tmp) / "sts-dev.csv"
        sts_file.write_text("\n".join(STS_DEV.read_text(encoding="utf-8").splitlines()[: args.sts_pairs]) + "\n",
                            encoding="utf-8")
        tps, cos = encoding(args.model, C.scifact_texts(args.docs), args.batch_size, args.max_length, args.repeats)
        print(f"encode texts/s {tps}, cosine min {cos.min():.6f} mean {cos.mean():.6f}", flush=True)
        argv = ["--model", args.model, "--data", C.texts_file(args.texts, tmp), "--batch-size", args.batch_size,
                "--out", Path(tmp) / "unused"]
        step_ms, losses = training(argv, args.steps)
        print(f"train ms/step {step_ms}", flush=True)
        attn = {name: sdpa_step(dtype, cast) for name, dtype, cast in
                (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                 ("bf16, cast to fp32", torch.bfloat16, True))}
        print(f"SDPA fwd+bwd ms {attn}", flush=True)
        sts = sts_scores(args.model, sts_file, 128)
    rows = [["encoding texts/s", f"{tps['fp32']:.1f}", f"{tps['bf16']:.1f}", f"{tps['bf16'] / tps['fp32']:.2f}",
             f"cosine fp32 vs bf16 per text: min {cos.min():.5f}, mean {cos.mean():.5f}"],
            ["training ms/step", f"{step_ms['fp32']:.0f}", f"{step_ms['bf16']:.0f}",
             f"{step_ms['fp32'] / step_ms['bf16']:.2f}",
             f"bf16 with attention in bf16: {step_ms['bf16, attention in bf16']:.0f} ms "
             f"(x{step_ms['fp32'] / step_ms['bf16, attention in bf16']:.2f}); last loss fp32 "
             f"{losses['fp32'][-1]:.4f}, bf16 {losses['bf16'][-1]:.4f}"],
            ["SDPA fwd+bwd ms (B32 H9 T32 hd64)", f"{attn['fp32']:.1f}", f"{attn['bf16']:.1f}",
             f"{attn['fp32'] / attn['bf16']:.2f}", f"bf16 inputs cast to fp32: {attn['bf16, cast to fp32']:.1f} ms"]]
    rows += [[f"STS-B dev cosine Spearman, {a}/{pl}", f"{s['fp32']:.4f}", f"{s['bf16']:.4f}", "",
              f"difference {s['bf16'] - s['fp32']:+.4f}"] for (a, pl), s in sts.items()]
    notes = [f"Model {Path(args.model).name}; encoding {args.docs} SciFact documents, batch {args.batch_size}, max "
             f"length {args.max_length}, median of {args.repeats} runs per dtype (alternating, after a warm-up); "
             f"training: stage 1, LoRA r=16 on 7 projections, batch {args.batch_size} of the first {args.texts} "
             f"Wikipedia sentences (length-grouped), {args.steps} steps per variant alternating after a warm-up; "
             f"STS-B dev: the first {args.sts_pairs} pairs, max length 128; {args.threads} thread(s).",
             f"This CPU has bf16 units (avx512_bf16 / amx_bf16 / bf16 flag): {E.cpu_has_bf16()}; "
             f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}.",
             "Speedup = fp32 time / bf16 time. Training in bf16 runs its attention in fp32 (model.attend); the "
             "'attention in bf16' variant shows the step without that cast."]
    C.report("bf16 vs fp32 on CPU", ["what", "fp32", "bf16", "speedup", "notes"], rows, notes,
             write=not args.no_write)


if __name__ == "__main__":
    main()
