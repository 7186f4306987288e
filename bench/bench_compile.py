"""torch.compile (t2t.py train --compile, Embedder.compile) vs eager: compile time and speed.

    python bench/bench_compile.py [--model smollm2] [--precisions fp32,bf16] [--steps 10] [--docs 128]
    python bench/bench_compile.py --quick        (stories260K, tiny sizes: checks that it runs)

Training: the stage-1 step of t2t.py train (bench/common.py Stage1Steps: LoRA r=16 on the 7
projections, batch 32 of the bundled Wikipedia sentences in length-grouped batches, max length
128, sparse KL, AdamW), once eager and once with --compile (model.compile_layers), same adapters
and batches. Compile time = the first compiled step minus a steady compiled one: what a run pays
before its first step (the stage-2 teacher and evaluation each pay a smaller one on first use).
Steady state: steps alternating eager/compiled, after warm-up, medians; break-even = compile time
/ time saved per step. Encoding: Embedder.encode of SciFact documents, eager vs compiled, texts/s
(first call = compile), and the embeddings' agreement (min cosine). The inductor cache starts
empty (bench/common.py fresh_inductor_cache): a first run's compile time; later runs of the
same shapes hit the cache.

Dimensions: B batch, T tokens, D hidden.
Not included: mode="max-autotune" and CUDA graphs (bench/gpu_check.py times CUDA), stage 2.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import model  # noqa: E402


def time_training(argv, device, steps, warmup=2):
    """Eager vs compiled stage-1 steps on the same batches -> dict of measurements."""
    eager = C.Stage1Steps(argv, device)
    compiled = C.Stage1Steps(argv + ["--compile"], device)
    C.sync(device)
    t = time.perf_counter()
    eager.step(0)
    C.sync(device)
    first_eager = time.perf_counter() - t
    t = time.perf_counter()
    compiled.step(0)  # traces and compiles layer 0's graph and the others' (forward and backward)
    C.sync(device)
    first_compiled = time.perf_counter() - t
    times, losses, tokens = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}, 0
    for position in range(1, warmup + steps + 1):
        order = (("eager", eager), ("compiled", compiled))
        for name, side in order if position % 2 else order[::-1]:
            C.sync(device)
            t = time.perf_counter()
            loss, n_tok = side.step(position)
            C.sync(device)
            if position > warmup:
                times[name].append(time.perf_counter() - t)
                losses[name].append(loss)
        tokens += n_tok if position > warmup else 0
    med = {k: C.median(v) for k, v in times.items()}
    return dict(first_eager=first_eager, compile_s=first_compiled - med["compiled"], eager_ms=med["eager"] * 1e3,
                compiled_ms=med["compiled"] * 1e3, tokens_per_step=tokens / steps,
                loss_diff=max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])))


def time_encoding(model_path, dtype, device, texts, batch_size, max_length, repeats):
    """Embedder.encode eager vs compiled on the same weights -> dict of measurements."""
    eager = model.Embedder.from_pretrained(model_path, "mean", "bidirectional", max_length, device=device, dtype=dtype)
    compiled = model.Embedder.from_pretrained(model_path, "mean", "bidirectional", max_length, device=device,
                                              dtype=dtype).compile()
    out, times = {}, {"eager": [], "compiled": []}
    t = time.perf_counter()
    out["eager"] = eager.encode(texts, batch_size)
    first_eager = time.perf_counter() - t
    t = time.perf_counter()
    out["compiled"] = compiled.encode(texts, batch_size)
    first_compiled = time.perf_counter() - t
    for i in range(repeats):
        for name, side in (("eager", eager), ("compiled", compiled)) if i % 2 == 0 else \
                (("compiled", compiled), ("eager", eager)):
            C.sync(device)
            t = time.perf_counter()
            out[name] = side.encode(texts, batch_size)
            C.sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: C.median(v) for k, v in times.items()}
    a, b = out["eager"], out["compiled"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return dict(compile_s=first_compiled - med["compiled"], first_eager=first_eager,
                eager_tps=len(texts) / med["eager"], compiled_tps=len(texts) / med["compiled"],
                min_cos=float(cos.min()))


def break_even(compile_s, saved_s):
    return f"{compile_s / saved_s:.0f}" if saved_s > 0 else "never"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="model name, GGUF file or HF folder")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per side")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--texts", type=int, default=2048, help="Wikipedia sentences the batches come from")
    p.add_argument("--docs", type=int, default=128, help="SciFact documents encoded")
    p.add_argument("--max-length", type=int, default=256, help="encoding: tokens per document")
    p.add_argument("--repeats", type=int, default=3, help="timed encoding runs per side")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--warm-cache", action="store_true", help="use inductor's usual cache (default: an empty one)")
    p.add_argument("--quick", action="store_true", help="stories260K, 3 steps, 16 documents: checks that it runs")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.model, args.steps, args.texts, args.docs, args.max_length, args.repeats = \
            str(C.STORIES), 3, 256, 16, 64, 1
        args.batch_size, args.warm_cache, args.no_write = 16, True, True
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.warm_cache:
            C.fresh_inductor_cache(Path(tmp) / "inductor")
        data = C.texts_file(args.texts, tmp)
        docs = C.scifact_texts(args.docs)
        for precision in args.precisions.split(","):
            argv = ["--model", args.model, "--data", data, "--batch-size", args.batch_size, "--precision", precision,
                    "--device", args.device, "--out", Path(tmp) / "unused"]
            tr = time_training(argv, args.device, args.steps)
            print(f"train {precision}: {tr}", flush=True)
            saved = (tr["eager_ms"] - tr["compiled_ms"]) / 1e3
            rows.append([f"training step, {precision}", f"{tr['eager_ms']:.0f} ms", f"{tr['compiled_ms']:.0f} ms",
                         f"{tr['eager_ms'] / tr['compiled_ms']:.2f}", f"{tr['compile_s']:.1f}",
                         break_even(tr["compile_s"], saved), f"loss diff {tr['loss_diff']:.1e}"])
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            en = time_encoding(args.model, dtype, args.device, docs, args.batch_size, args.max_length, args.repeats)
            print(f"encode {precision}: {en}", flush=True)
            saved = len(docs) / en["eager_tps"] - len(docs) / en["compiled_tps"]
            rows.append([f"encoding, {precision}", f"{en['eager_tps']:.1f} texts/s", f"{en['compiled_tps']:.1f} texts/s",
                         f"{en['compiled_tps'] / en['eager_tps']:.2f}", f"{en['compile_s']:.1f}",
                         f"{break_even(en['compile_s'], saved / len(docs))} texts",
                         f"min cosine {en['min_cos']:.6f}"])
    notes = [f"Model {Path(args.model).name}; training: stage 1, LoRA r=16 on 7 projections, batch {args.batch_size} "
             f"of the first {args.texts} Wikipedia sentences (length-grouped), max length 128, {args.steps} timed "
             f"steps per side alternating after 2 warm-up; encoding: {args.docs} SciFact documents, batch "
             f"{args.batch_size}, max length {args.max_length}, median of {args.repeats} runs per side; device "
             f"{args.device}, {args.threads} thread(s); inductor cache {'warm' if args.warm_cache else 'empty at start'}.",
             "Compile s: the first compiled step (or encode call) minus a steady one: paid once per run, before "
             "training starts. Break-even: steps (or texts) after which compiling has paid for itself.",
             "The agreement column: training losses of the two sides on the same batches (the same dropout masks; "
             "fused kernels round differently, most in bf16), encoding embeddings' min cosine."]
    C.report("torch.compile vs eager", ["what", "eager", "compiled", "speedup", "compile s", "break-even steps",
                                        "agreement"], rows, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
