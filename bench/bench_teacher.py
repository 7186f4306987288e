"""Stage-2 teacher overhead: a training step with on-the-fly targets vs precomputed sparse ones.

    python bench/bench_teacher.py [--threads 1] [--repeats 10] [--batch 8] [--tokens 128]

On the fly (t2t.py train --stage 2 without --targets): the teacher, i.e. the student with its
LoRA switched off (no second copy of the weights), runs forward under no_grad; its pooled
logits give q = model_derived_target(z, theta, tau) [B, V]; the student step follows with the
dense KL. Precomputed (--targets from `t2t.py targets --stage 2`): the same step on the
top-64 sparse target read from memory. The loop body is t2t.train's (forward, KL, backward,
clip, AdamW step). One process, variants alternating, medians.

Dimensions: B batch, T tokens, V vocabulary, k sparse slots.
Not included: the background pass (once per run, cached in the run directory), bf16.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import model as M  # noqa: E402
import targets as T  # noqa: E402

TAU, K, R, ALPHA, DROPOUT = 1e-4, 64, 16, 32, 0.05


def write_checkpoint(path):
    import hf_reference
    C.quiet_transformers()
    return hf_reference.save_random_checkpoint(path, C.BENCH_LLAMA, seed=0)


def step(model, emb, params, opt, ids, mask, theta=None, sparse=None):
    """One optimizer step of t2t.train's loop; the target is built on the fly when theta is given."""
    if theta is not None:  # the teacher: the student with its adapter off, no grad
        with torch.no_grad(), M.lora_enabled(model, False):
            target = T.model_derived_target(model.token_logits(emb.embed_ids(ids, mask, mask)), theta, TAU)  # [B, V]
    else:
        target = sparse  # (ids [B, k], weights [B, k])
    logits = model.token_logits(emb.embed_ids(ids, mask, mask))  # [B, V] fp32
    loss = T.kl_loss(logits, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a busy machine)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="longest text in tokens; others 1/4..1 of it")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = M.load(write_checkpoint(Path(tmp) / "ckpt"))
    params = M.add_lora(model, R, ALPHA, DROPOUT)
    model.train()
    emb = M.Embedder(model, tok, "mean", causal=False)
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    ids, mask = C.random_lengths_batch(args.batch, args.tokens, C.BENCH_LLAMA["vocab_size"], seed=0)
    with torch.no_grad(), M.lora_enabled(model, False):
        other, other_mask = C.random_lengths_batch(32, args.tokens, C.BENCH_LLAMA["vocab_size"], seed=1)
        theta = model.token_logits(emb.embed_ids(other, other_mask, other_mask)).mean(0)  # [V] background
        q = T.model_derived_target(model.token_logits(emb.embed_ids(ids, mask, mask)), theta, TAU)
        sparse = tuple(t.long() if t.dtype == torch.int32 else t for t in T.topk_sparse(q, K))
    runs = {"on the fly": lambda: step(model, emb, params, opt, ids, mask, theta=theta),
            "precomputed": lambda: step(model, emb, params, opt, ids, mask, sparse=sparse)}
    times = {k: [] for k in runs}
    for i in range(args.repeats + 2):  # 2 warm-up steps each
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            t0 = time.perf_counter()
            runs[name]()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: C.median(v) * 1000 for k, v in times.items()}
    rows = [[k, f"{med[k]:.1f}", f"{min(times[k]) * 1000:.1f}"] for k in runs]
    rows.append(["ratio on the fly / precomputed", f"{med['on the fly'] / med['precomputed']:.2f}", ""])
    notes = [f"BENCH_LLAMA (D=256, 4 layers, V=32000), B={args.batch}, T={args.tokens}, LoRA r={R}, fp32, "
             f"tau={TAU}, sparse k={K}; {args.repeats} timed steps per variant (alternating, after 2 warm-up).",
             f"The teacher adds {med['on the fly'] / med['precomputed'] - 1:.0%} to a step: one forward pass "
             "under no_grad (a forward is roughly a third of forward+backward+step), plus the dense [B, V] "
             "target and KL, small next to it. Precomputing (`t2t.py targets --stage 2`) saves that per "
             "epoch, at the cost of one teacher pass over the corpus and a top-k truncation of q."]
    C.report("Stage-2 teacher overhead (CPU)", ["targets", "median ms/step", "min ms"], rows, notes,
             write=not args.no_write)


if __name__ == "__main__":
    main()
