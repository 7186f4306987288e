"""Where the memory of a real-model training step goes on CPU, and what row chunks
(t2t.py --max-batch-tokens) cost in time.

    python bench/bench_memory.py [--model smollm2] [--precisions bf16,fp32] [--chunks 0,1024,2048]
                                 [--what train,time,theirs,eval] [--steps 6] [--max-t 64]

Each measurement runs in a fresh subprocess (so that one's peak cannot hide another's), pinned to
what the caller pinned, and prints one JSON line:
  train: t2t.py train's stage-1 step of the smollm2 preset (causal attention, last-token pooling
         with PromptEOL, batch 32, max length 128, LoRA r16 on 7 projections, AdamW), outside the
         loop (bench/common.py Stage1Steps, which runs t2t.row_chunks as the loop does), on the 32
         longest texts of the sample (T = 128, the worst batch the preset can draw) in chunks of at
         most --max-batch-tokens positions (the --extra flags; default 1024 on CPU):
         - weights, LoRA parameters, gradients and AdamW state: bytes of their storages;
         - saved for backward by the first chunk: every tensor autograd packs
           (torch.autograd.graph.saved_tensors_hooks), once per storage, frozen weights excluded,
           grouped by the module that saved it (layers.N.mlp.up_proj -> mlp.up_proj);
         - the peak of live tensors during a step (torch.profiler's memory events, summed in time
           order), peak RSS (VmHWM after a reset) and RSS after the steps: the difference between
           RSS and live tensors is what glibc's malloc keeps of freed memory.
  time:  optimizer steps with each --chunks value alternating on the same batches in one process
         (identical set-ups from the same seed; the preset's first batches of at most --max-t
         tokens, so that the unchunked step stays inside this machine's memory), median seconds
         and the losses (equal up to dropout draws, which differ between chunkings).

  theirs: the same measurement of one step of bench/bench_peers.py's transformers + peft loop (the
         authors' kind: every text padded to max length 128, eager attention, the LM head on every
         position through output_hidden_states, fp32 LM head and embeddings, a dense [B, V] target)
         on the same model's weights written as an HF folder, batch 32 of the sample's longest texts
         (their shapes do not depend on which texts: [32, 128] always), AdamW; needs peft.

  eval:  evaluate.py's pass as `evaluate.py --model M --attention causal --pooling last --dtype D
         --max-length 128` runs it (load_encoder, then Embedder.encode at batch 32 under no_grad) on
         SciFact's 512 longest documents (every batch [32, 128], the evaluator's worst): weights, the
         peak of live tensors while one batch is encoded, peak RSS above the loaded model over all 16
         batches, and RSS after them. The stage-2 teacher runs the same no_grad forward.

Dimensions: B batch, T tokens, D hidden, F MLP width, H heads, K kv heads, hd head dim, V vocab.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import t2t  # noqa: E402


def preset_argv(model, precision, extra=()):
    return ["--preset", "smollm2", "--stage", "1", "--model", model, "--precision", precision,
            "--out", "unused"] + list(extra)


def longest(steps, B) -> list[int]:
    """The B longest texts of the sample: the worst batch the preset can draw."""
    return sorted(range(len(steps.tokenized)), key=lambda i: -len(steps.tokenized[i][0]))[:B]


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensors:
    """Counts the bytes autograd saves for backward, once per storage, by the module saving them.
    Frozen weights (parameters) are not counted: they are the weights, held anyway."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.where = ["outside"]
        self.by_storage = {}  # data_ptr -> (bytes, module name, dtype)
        self.handles = []
        for name, mod in model.named_modules():
            if name:
                self.handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: self.where.append(n)))
                self.handles.append(mod.register_forward_hook(lambda m, a, o: self.where.pop() and None))

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.by_storage:
            self.by_storage[ptr] = (t.untyped_storage().nbytes(), self.where[-1], str(t.dtype).replace("torch.", ""))
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def remove(self):
        for h in self.handles:
            h.remove()

    def breakdown(self) -> dict:
        """'kind (dtype)' -> bytes, the module names folded into kinds: layers.N.mlp.gate_proj -> mlp.gate_proj."""
        out = collections.Counter()
        for nbytes, tag, dtype in self.by_storage.values():
            parts = tag.split(".")
            kind = ".".join(parts[2:]) if parts[0] == "layers" else tag
            out[f"{kind or 'layer'} ({dtype})"] += nbytes
        return dict(out)

    def total(self) -> int:
        return sum(nbytes for nbytes, _, _ in self.by_storage.values())


def live_peak(fn):
    """(peak bytes of live CPU tensors above the start, result of fn) from torch.profiler's memory
    events: every allocation and free the CPU allocator reports, summed in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak, out


def child_train(args):
    rss0 = C.rss_bytes()
    steps = C.Stage1Steps(preset_argv(args.model, args.precision, args.extra.split()))
    rss_loaded = C.rss_bytes()
    max_tokens = t2t.max_batch_tokens(steps.args, steps.device)
    base = [p for p in steps.model.parameters() if not p.requires_grad]
    out = dict(precision=args.precision, extra=args.extra, max_tokens=max_tokens, rss_after_imports=rss0,
               rss_after_load=rss_loaded, weights=storage_bytes(base), lora=storage_bytes(steps.params))
    worst = longest(steps, steps.args.batch_size)
    chunks = t2t.row_chunks([len(steps.tokenized[i][0]) for i in worst], max_tokens)
    first = steps.rows([worst[j] for j in chunks[0]])
    out.update(B=len(worst), T=int(first[0].shape[1]), chunk_rows=[len(c) for c in chunks])
    saved = SavedTensors(steps.model)  # what the first chunk saves for backward
    with saved.hooks():
        loss = steps.loss(*first)
    saved.remove()
    out.update(saved=saved.breakdown(), saved_total=saved.total(), saved_positions=first[0].numel())
    loss.backward()
    out["grads"] = storage_bytes([p.grad for p in steps.params])
    steps.opt.zero_grad(set_to_none=True)
    del loss
    steps.step_on(worst)  # AdamW's state exists from here
    out["adam_state"] = storage_bytes([t for s in steps.opt.state.values() for t in s.values() if t.dim()])
    base_rss = C.rss_bytes()
    out["reset"] = C.reset_peak()
    t0 = time.perf_counter()
    out["loss_worst"], _ = steps.step_on(worst)
    out["step_s_worst"] = time.perf_counter() - t0
    out["peak_rss_step_above"] = C.peak_rss_bytes() - base_rss
    out["live_peak_step_above"], _ = live_peak(lambda: steps.step_on(worst))
    out["rss_end"], out["peak_rss"] = C.rss_bytes(), C.peak_rss_bytes()
    print(json.dumps(out))


def child_time(args):
    """Step time of each --chunks value, alternating on the same batches in one process."""
    values = [int(v) for v in args.chunks.split(",")]
    sides = {v: C.Stage1Steps(preset_argv(args.model, args.precision, args.extra.split())) for v in values}
    first = sides[values[0]]
    positions = [p for p in range(args.steps * 8) if first.batch(p)[0].shape[1] <= args.max_t][:args.steps]
    times, losses = {v: [] for v in values}, {v: [] for v in values}
    for n, pos in enumerate(positions):
        for v in values if n % 2 == 0 else values[::-1]:
            t0 = time.perf_counter()
            losses[v].append(sides[v].step(pos, v)[0])
            times[v].append(time.perf_counter() - t0)
    Ts = [int(first.batch(p)[0].shape[1]) for p in positions]
    print(json.dumps(dict(precision=args.precision, T=Ts, times=times, losses=losses,
                          median_s={v: C.median(times[v]) for v in values}, peak_rss=C.peak_rss_bytes())))


def child_theirs(args):
    """Peak RSS of one optimizer step of the transformers + peft loop (bench_peers.py) on the 32
    longest texts, measured as child_train measures ours (after a first step has made AdamW's state)."""
    import bench_peers as P
    from transformers import AutoTokenizer
    C.quiet_transformers()
    rss0 = C.rss_bytes()
    tok = AutoTokenizer.from_pretrained(args.folder)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    net = P.their_model(args.folder, args.precision, "eager")
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=P.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    texts = t2t.read_texts(t2t.DEFAULT_DATA)
    worst = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i])["input_ids"]))[:P.BATCH]
    data = P.TheirDataset(texts, tok, P.bad_id_rule(tok))
    batch = P.their_collate([data[i] for i in worst])
    vocab = net.get_output_embeddings().weight.shape[0]
    out = dict(precision=args.precision, side="transformers + peft", rss_after_imports=rss0,
               rss_after_load=C.rss_bytes(), B=P.BATCH, T=int(batch["input_ids"].shape[1]),
               weights=storage_bytes([p for p in net.parameters() if not p.requires_grad]),
               lora=storage_bytes(params))
    P.train_step(net, batch, vocab, args.precision, params, opt, sched)  # AdamW's state exists from here
    out["peak_rss_first_step"] = C.peak_rss_bytes()
    base_rss = C.rss_bytes()
    out["reset"] = C.reset_peak()
    t0 = time.perf_counter()
    out["loss_worst"] = P.train_step(net, batch, vocab, args.precision, params, opt, sched)
    out["step_s_worst"] = time.perf_counter() - t0
    out["peak_rss_step_above"] = C.peak_rss_bytes() - base_rss
    out["rss_end"], out["peak_rss"] = C.rss_bytes(), C.peak_rss_bytes()
    print(json.dumps(out))


def child_eval(args):
    """Peak RSS and live tensors of the evaluator's encoding pass (module docstring, eval)."""
    import evaluate as E
    rss0 = C.rss_bytes()
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.precision]
    eargs = E.parse_args(["--model", args.model, "--attention", "causal", "--pooling", "last", "--dtype", dtype,
                          "--max-length", "128"])
    emb, *_ = E.load_encoder(args.model, eargs)
    docs = E.read_beir(E.resolve_task("SciFact")[2]).docs
    enc = emb.tokenizer.encode_with_prompt(docs, emb.prompt, emb.max_length)
    texts = [docs[i] for i in sorted(range(len(docs)), key=lambda i: -len(enc[i][0]))[:512]]
    out = dict(precision=args.precision, rss_after_imports=rss0, rss_after_load=C.rss_bytes(),
               weights=storage_bytes(list(emb.model.parameters())), B=32, texts=len(texts),
               T=max(len(ids) for ids, _ in emb.tokenizer.encode_with_prompt(texts, emb.prompt, emb.max_length)))
    emb.encode(texts[:32], batch_size=32)  # a first batch: one-time buffers (rotary tables, kernels)
    base_rss = C.rss_bytes()
    out["reset"] = C.reset_peak()
    t0 = time.perf_counter()
    emb.encode(texts, batch_size=32)
    out["texts_per_s"] = len(texts) / (time.perf_counter() - t0)
    out["peak_rss_above_loaded"] = C.peak_rss_bytes() - base_rss
    out["live_peak_batch"], _ = live_peak(lambda: emb.encode(texts[:32], batch_size=32))
    out["rss_end"], out["peak_rss"] = C.rss_bytes(), C.peak_rss_bytes()
    print(json.dumps(out))


def run_child(kind, args, precision, extra="", folder=""):
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--precision", precision,
           "--steps", str(args.steps), "--chunks", args.chunks, "--max-t", str(args.max_t), "--extra", extra,
           "--folder", str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {precision} {extra} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="model name, GGUF file or HF folder")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16, fp32")
    p.add_argument("--chunks", default="0,1024,2048",
                   help="train: each value's step (--max-batch-tokens); time: the values alternated")
    p.add_argument("--steps", type=int, default=6, help="time: the preset's first batches timed")
    p.add_argument("--max-t", type=int, default=64, help="time: only batches of at most this many tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--what", default="train,time", help="comma-separated: train, time, theirs, eval")
    p.add_argument("--child", choices=["train", "time", "theirs", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        return {"train": child_train, "time": child_time, "theirs": child_theirs, "eval": child_eval}[args.child](args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ""
        if "theirs" in args.what.split(","):  # our load written as an HF folder, here, not in the measured child
            import bench_peers as P
            folder = P.hf_folder(args.model, tmp)
        for precision in args.precisions.split(","):
            for what in args.what.split(","):
                extras = [f"--max-batch-tokens {v}" for v in args.chunks.split(",")] if what == "train" else [""]
                for extra in extras:
                    res = run_child(what, args, precision, extra, folder)
                    print(json.dumps(dict(what=what, **res)), flush=True)


if __name__ == "__main__":
    main()
