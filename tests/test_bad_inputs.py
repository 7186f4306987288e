"""What happens to odd, corrupted and hostile inputs, case by case (tests/test_fuzz_readers.py
fuzzes the same readers at random): text files (a BOM, CRLF, a lone CR, U+2028, NUL bytes, bad
UTF-8, a 10 MB line, blank lines), model folders (wrong types and sizes in config.json, a
corrupted or integer safetensors file, tokenizer files), run directories (meta.json's
format_version and keys), targets files; non-finite numbers (weights, targets, embeddings,
scores, an LM head that overflows); model names that mteb accepts. Each is read as documented in
the reader's docstring or refused with the project's own error naming the file and line or key.
"""

import codecs
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import model  # noqa: E402
import t2t  # noqa: E402
import targets  # noqa: E402
import tokenizer  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
WIKI = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"


def raises(error, fn, *needles):
    """fn() raises `error` (exactly the project's type) whose message contains every needle."""
    with pytest.raises(error) as e:
        fn()
    for needle in needles:
        assert str(needle) in str(e.value), f"{needle!r} not in: {e.value}"
    return str(e.value)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(STORIES, path)
    return path


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensor(file, key, edit):
    state = load_file(str(file))
    state[key] = edit(state[key].clone())
    save_file(state, str(file))


# -----------------------------------------------------------------------------
# Text files: one set of line rules (evaluate.text_lines) for --data, STS and BEIR files


def test_training_texts_line_rules(tmp_path, capsys):
    long_line = "word " * 2_000_000  # 10 MB on one line: one text (tokenization truncates it)
    path = tmp_path / "texts.txt"
    path.write_bytes(codecs.BOM_UTF8 + "first\r\n\r\n  \nsecond\u2028half\rstill\n".encode() + long_line.encode()
                     + b"\r\nlast")
    assert t2t.read_texts(path) == ["first", "second\u2028half\rstill", long_line, "last"]
    assert "2 blank line(s) ignored" in capsys.readouterr().out  # counted and reported, not silent
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + b'{"text": "a\\u0000b"}\r\n{"text": "</s>"}\r\n')
    assert t2t.read_texts(jsonl) == ["a\x00b", "</s>"]  # a JSON escape is the writer's choice: kept


@pytest.mark.parametrize("bad, line, what", [
    (b"nul \x00 here", 2, "NUL byte at column 5"),
    (b"\xff\xfebad", 3, "not UTF-8 (byte 0xff at column 1)"),
    ("caf\u00e9".encode("utf-16"), 1, "NUL byte at column 4 (a binary, UTF-16"),
    (b"\xed\xa0\x80 a surrogate", 2, "not UTF-8"),
])
def test_training_texts_refuse_binary_with_the_line(tmp_path, bad, line, what):
    for suffix, good in ((".txt", b"ok\n"), (".jsonl", b'{"text": "ok"}\n')):
        path = tmp_path / f"texts{suffix}"
        path.write_bytes(good * (line - 1) + bad + b"\n" + good)
        raises(t2t.TrainError, lambda: t2t.read_texts(path), f"{path}:{line}: {what}")


def test_training_jsonl_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "a"}\n{"text": ' + "1" * 5000 + "}\n")  # past Python's int-size limit
    raises(t2t.TrainError, lambda: t2t.read_texts(path), f"{path}:2: invalid JSON")
    path.write_text('{"text": "a"}\n' + "[" * 100_000 + "\n")
    raises(t2t.TrainError, lambda: t2t.read_texts(path), f"{path}:2: invalid JSON")


def test_sts_and_beir_files_with_a_bom_and_crlf(tmp_path):
    sts = tmp_path / "pairs.tsv"
    sts.write_bytes(codecs.BOM_UTF8 + "sentence1\tsentence2\tscore\r\na\u2028b\tc\t1\r\n\r\nd\te\t2\r\n".encode())
    data = evaluate.read_sts(sts)
    assert data.sentences1 == ["a\u2028b", "d"] and data.scores.tolist() == [1.0, 2.0]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"_id": "d1", "text": "x"}\r\n{"_id": 2, "text": "y"}\r\n')
    (beir / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "x"}\r\n')
    (beir / "qrels" / "test.tsv").write_bytes(codecs.BOM_UTF8 + b"query-id\tcorpus-id\tscore\r\nq1\t2\t1\r\n")
    d = evaluate.read_beir(beir)
    assert d.doc_ids == ["d1", "2"] and d.qrels == {"q1": {"2": 1}}


@pytest.mark.parametrize("name, text, where, what", [
    ("a.jsonl", '{"sentence1": "a", "sentence2": ["b"], "score": 1}\n', ":1:", "sentence2 must be a string"),
    ("a.jsonl", '{"sentence1": "a", "sentence2": "b", "score": true}\n', ":1:", "score True is not a number"),
    ("a.jsonl", '{"sentence1": "a", "sentence2": "b", "score": NaN}\n', ":1:", "not a finite number"),
    ("a.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1e999}\n', ":1:", "not a finite number"),
    ("a.tsv", "sentence1\tsentence2\tscore\na\tb\tinf\n", ":2:", "not a finite number"),
    ("a.csv", 'sentence1,sentence2,score\n"a",b\rc,1\n', ":2:", "not a CSV row"),
    ("a.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nnul\x00\tb\t1\n", ":3:", "NUL byte"),
])
def test_sts_refusals_name_the_line(tmp_path, name, text, where, what):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    raises(evaluate.EvalError, lambda: evaluate.read_sts(path), f"{path}{where}", what)


@pytest.mark.parametrize("file, text, what", [
    ("corpus.jsonl", '{"_id": "d1", "title": 5, "text": "x"}\n', "'title' must be a string or null"),
    ("corpus.jsonl", '{"_id": ["d1"], "text": "x"}\n', "'_id' must be a string or an integer"),
    ("queries.jsonl", '{"_id": "q1", "text": "x"}\n{"_id": ' + "9" * 5000 + ', "text": "y"}\n', "not valid JSON"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", "judged 2 here and 1 at line 2"),
])
def test_beir_refusals_name_the_line(tmp_path, file, text, what):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (beir / file).write_text(text)
    raises(evaluate.EvalError, lambda: evaluate.read_beir(beir), str(beir / file), what)


# -----------------------------------------------------------------------------
# Model folders


@pytest.mark.parametrize("changes, needles", [
    (dict(hidden_size="64"), ["'hidden_size' must be an integer >= 1", "'64'"]),
    (dict(num_hidden_layers=True), ["'num_hidden_layers' must be an integer"]),
    (dict(hidden_size=2**40), ["vocab_size, hidden_size imply model.embed_tokens.weight", "(512, 1099511627776)"]),
    (dict(num_hidden_layers=10**12), ["num_hidden_layers is 1000000000000", "hold 5 layers"]),
    (dict(num_key_value_heads=3), ["not a multiple of num_key_value_heads 3"]),
    (dict(head_dim=7), ["head_dim 7 is odd"]),
    (dict(rms_norm_eps=float("nan")), ["'rms_norm_eps' must be a positive number"]),
    (dict(rope_scaling=[1, 2]), ["'rope_scaling' must be an object"]),
    (dict(rope_scaling={"rope_type": "linear"}), ["'rope_scaling.factor' must be a positive number"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                        "original_max_position_embeddings": 8192}), ["must exceed low_freq_factor"]),
    (dict(tie_word_embeddings="false"), ["'tie_word_embeddings' must be true or false"]),
    (dict(intermediate_size=100), ["intermediate_size, hidden_size imply", "(100, 64)", "(172, 64)"]),
])
def test_config_values_refused_with_the_key(ckpt, changes, needles):
    """Wrong types and sizes are named before any model is built: no torch error, no hang building
    a trillion layers on the meta device."""
    edit_json(ckpt / "config.json", **changes)
    raises(model.ModelError, lambda: model.load(ckpt), ckpt / "config.json", *needles)


def test_json_files_with_a_bom_read_and_bad_bytes_name_the_line(ckpt):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes(codecs.BOM_UTF8 + (STORIES / name).read_bytes())
    m, tok = model.load(ckpt)  # a BOM is dropped, as in every text file we read
    assert tok.encode(["Lily"])[0][0] == 1
    (ckpt / "config.json").write_bytes(b'{\n"a": 1,\n"b": "\xff"}')
    raises(model.ModelError, lambda: model.load(ckpt), f"{ckpt / 'config.json'}:3: not UTF-8")
    (ckpt / "config.json").write_text("[1, 2]")
    raises(model.ModelError, lambda: model.load(ckpt), "expected a JSON object at the top level, got list")


@pytest.mark.parametrize("changes, what", [
    (dict(bos_token=5), "'bos_token' is 5"),
    (dict(add_bos_token="yes"), "'add_bos_token' is 'yes', expected true or false"),
    (dict(eos_token={"content": ["</s>"]}), "'eos_token' is ['</s>']"),
])
def test_tokenizer_config_values_refused_with_the_key(ckpt, changes, what):
    edit_json(ckpt / "tokenizer_config.json", **changes)
    raises(model.ModelError, lambda: tokenizer.Tokenizer.from_dir(ckpt), ckpt / "tokenizer_config.json", what)


def test_safetensors_truncated_flipped_integer_duplicated(ckpt):
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated in the data
    raises(model.ModelError, lambda: model.load(ckpt), weights, "not a readable safetensors file")
    weights.write_bytes(good[:5])  # truncated in the length prefix
    raises(model.ModelError, lambda: model.load(ckpt), weights, "not a readable safetensors file")
    header_len = int.from_bytes(good[:8], "little")
    flipped = bytearray(good)
    flipped[8 + header_len // 2] ^= 0x80  # a non-ASCII byte in the JSON header
    weights.write_bytes(bytes(flipped))
    raises(model.ModelError, lambda: model.load(ckpt), weights, "not a readable safetensors file")
    weights.write_bytes(good)
    edit_tensor(weights, "model.norm.weight", lambda t: t.to(torch.int32))  # same shape, integer dtype
    raises(model.ModelError, lambda: model.load(ckpt), weights, "'model.norm.weight' has dtype torch.int32")
    weights.write_bytes(good)
    save_file({"model.norm.weight": torch.ones(64)}, str(ckpt / "extra.safetensors"))
    raises(model.ModelError, lambda: model.load(ckpt), "'model.norm.weight' is also in")


def test_index_names_only_files_beside_it(ckpt):
    index = ckpt / "model.safetensors.index.json"
    keys = list(load_file(str(ckpt / "model.safetensors")))
    for name in ("../model.safetensors", "x" * 5000 + ".safetensors", "a\x00b", 7):
        index.write_text(json.dumps({"weight_map": {k: name for k in keys}}))
        raises(model.ModelError, lambda: model.load(ckpt), index)


# -----------------------------------------------------------------------------
# Run directories: meta.json's format_version and keys


def train_tiny_run(tmp_path, *extra):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(WIKI.read_text().splitlines()[:16]) + "\n")
    argv = [str(a) for a in ["--data", data, "--out", tmp_path / "run", "--batch-size", 8, "--max-steps", 1,
                             "--lora-r", 2, "--lora-dropout", 0, *extra]]
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    return t2t.train(t2t.apply_preset(p.parse_args(argv), argv))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"))


def fresh_copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_train_writes_format_version_and_load_checks_it(lora_run, tmp_path):
    meta = json.loads((lora_run / "meta.json").read_text())
    assert meta["format_version"] == checkpoints.RUN_FORMAT == 1
    model.Embedder.from_run(lora_run)  # reads
    run = fresh_copy(lora_run, tmp_path)
    for value, what in [(2, "'format_version' is 2"), ("1", "'format_version' is '1'"), (None, "is None")]:
        edit_json(run / "meta.json", format_version=value)
        raises(model.ModelError, lambda: model.load(run), run / "meta.json", what)
    del meta["format_version"]
    (run / "meta.json").write_text(json.dumps(meta))
    raises(model.ModelError, lambda: model.Embedder.from_run(run), run / "meta.json", "missing key 'format_version'")
    raises(model.ModelError, lambda: checkpoints.base_checkpoint_dir(run), "missing key 'format_version'")


@pytest.mark.parametrize("changes, what", [
    (dict(base_model=5), "'base_model' must be a path, got 5"),
    (dict(base_model="/no/such/folder"), "'base_model' names '/no/such/folder', which is not a directory"),
    (dict(init=["x"]), "'init' must be a path or null"),
    (dict(lora={"r": 2, "alpha": 4.0}), "'lora.targets' must be a list"),
    (dict(lora={"r": 3, "alpha": 4.0, "targets": ["q_proj"]}), "'lora.r' is 3, but"),
    (dict(lora={"r": 2, "alpha": 4.0, "targets": ["q_prj"]}), "'lora.targets': LoRA target(s) q_prj"),
    (dict(lora={"r": 2, "alpha": "4", "targets": ["q_proj"]}), "'lora.alpha' must be a positive number"),
    (dict(lora=None), "key 'lora' is null (full fine-tuning), but"),
    (dict(embedding={"pooling": "max"}), "'embedding.pooling' is 'max', expected mean or last"),
    (dict(embedding={"max_length": 0}), "'embedding.max_length' is 0"),
    (dict(embedding={"prompt": "no placeholder"}), "'embedding.prompt' is 'no placeholder'"),
    (dict(embedding=[]), "'embedding' must be an object"),
    (dict(args="x"), "'args' must be an object"),
])
def test_meta_keys_refused_with_the_key(lora_run, tmp_path, changes, what):
    run = fresh_copy(lora_run, tmp_path)
    edit_json(run / "meta.json", **changes)
    raises(model.ModelError, lambda: model.Embedder.from_run(run), run / "meta.json", what)


def test_runs_that_name_each_other_are_refused(lora_run, tmp_path):
    a, b = fresh_copy(lora_run, tmp_path), tmp_path / "b"
    shutil.copytree(lora_run, b)
    edit_json(a / "meta.json", init=str(b))
    edit_json(b / "meta.json", init=str(a))
    raises(model.ModelError, lambda: model.load(a), "form a loop")


def test_resume_of_a_run_from_another_version_is_refused(lora_run, tmp_path):
    run = fresh_copy(lora_run, tmp_path)
    edit_json(run / "meta.json", format_version=0)
    with pytest.raises(model.ModelError, match="format_version"):
        train_tiny_run(tmp_path, "--resume")


# -----------------------------------------------------------------------------
# Targets files


def test_targets_outside_the_vocabulary_refused(tmp_path):
    ids = torch.full((16, 2), -1, dtype=torch.int32)
    ids[:, 0] = 5
    ids[3, 0] = 600  # stories260K has 512 ids
    w = (ids >= 0).float()
    path = tmp_path / "t.safetensors"
    targets.save_targets(path, ids, w, {"kind": "data-driven"})
    with pytest.raises(t2t.TrainError, match=r"t.safetensors: token id 600 is outside the model's vocabulary \(512"):
        train_tiny_run(tmp_path, "--targets", path)


def test_targets_header_must_be_an_object(tmp_path):
    ids, w, _ = targets.precompute_data_driven(["cats purr", "dogs bark"], tokenizer.Tokenizer.from_dir(STORIES), 16, 4)
    path = tmp_path / "t.safetensors"
    save_file({"ids": ids, "weights": w}, str(path), metadata={"text2token": "[1, 2]"})
    raises(targets.TargetsError, lambda: targets.load_targets(path), path, "must be a JSON object, got list")
    save_file({"ids": ids, "weights": w}, str(path), metadata={"text2token": "1" * 5000})
    raises(targets.TargetsError, lambda: targets.load_targets(path), path, "is not JSON")


# -----------------------------------------------------------------------------
# Non-finite numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_refused_at_load(ckpt, bad):
    edit_tensor(ckpt / "model.safetensors", "model.layers.3.mlp.down_proj.weight", lambda t: t.index_fill_(0, torch.tensor([7]), bad))
    raises(model.ModelError, lambda: model.load(ckpt), ckpt / "model.safetensors",
           "'model.layers.3.mlp.down_proj.weight' holds NaN or infinite values")


def test_weight_that_overflows_the_load_dtype_refused(ckpt):
    edit_tensor(ckpt / "model.safetensors", "model.norm.weight", lambda t: t.index_fill_(0, torch.tensor([0]), 1e6))
    assert model.load(ckpt, dtype=torch.float32)  # finite in fp32
    raises(model.ModelError, lambda: model.load(ckpt, dtype=torch.float16), "'model.norm.weight' holds values too "
           "large for torch.float16")


def test_nonfinite_run_weights_refused(lora_run, tmp_path, capsys):
    run = fresh_copy(lora_run, tmp_path)
    (run / files.MANIFEST).unlink()  # its checksums would refuse any edit; without it the values are still checked
    key = next(k for k in load_file(str(run / "adapter.safetensors")) if "lora_B" in k)
    edit_tensor(run / "adapter.safetensors", key, lambda t: t.fill_(float("nan")))
    raises(model.ModelError, lambda: model.load(run), run / "adapter.safetensors", f"{key!r} holds NaN")
    full = tmp_path / "full"
    full.mkdir()
    (full / "meta.json").write_text(json.dumps({"format_version": 1, "base_model": str(STORIES), "lora": None}))
    shutil.copy(STORIES / "model.safetensors", full / "model.safetensors")
    edit_tensor(full / "model.safetensors", "model.norm.weight", lambda t: t.fill_(float("inf")))
    raises(model.ModelError, lambda: model.load(full), full / "model.safetensors", "'model.norm.weight' holds")


def test_nonfinite_targets_refused(tmp_path):
    ids = torch.tensor([[3, 5], [4, -1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.5], [float("nan"), 0.0]])
    path = tmp_path / "t.safetensors"
    save_file({"ids": ids, "weights": w}, str(path), metadata={"text2token": "{}"})
    raises(targets.TargetsError, lambda: targets.load_targets(path), path, "row 1 of weights holds NaN")


class NaNFor:
    """An encoder that returns a NaN embedding for one text (as a model with broken weights would)."""

    def __init__(self, poison):
        self.poison = poison

    def encode(self, texts, batch_size=32):
        out = np.ones((len(texts), 4), np.float32) * np.arange(1, len(texts) + 1, dtype=np.float32)[:, None]
        out[[i for i, t in enumerate(texts) if t == self.poison], 1] = np.nan
        return out


def test_nan_embedding_names_model_task_text_and_writes_nothing(tmp_path):
    sts = tmp_path / "mini.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\ne\tpoison\t3\n", encoding="utf-8")
    args = evaluate.parse_args(["--tasks", str(sts), "--output", str(tmp_path / "out")])
    msg = raises(evaluate.NonFiniteError, lambda: evaluate.evaluate_model(NaNFor("poison"), "local/broken", "0" * 12,
                                                                         {}, args),
                 "model local/broken, task mini", "sentence2", "text 2 ('poison'")
    assert not (tmp_path / "out").exists(), msg


def test_nan_score_is_never_written(tmp_path):
    scores = {"cosine_spearman": float("nan"), "main_score": float("nan")}
    raises(evaluate.NonFiniteError, lambda: evaluate.write_mteb_result("STSBenchmark", scores, tmp_path, "local/x", "r"),
           "model local/x, task STSBenchmark", "score cosine_spearman is nan")
    assert not any(tmp_path.iterdir())
    constant = tmp_path / "constant.tsv"
    constant.write_text("sentence1\tsentence2\tscore\na\tb\t2\nc\td\t2\n", encoding="utf-8")
    raises(evaluate.EvalError, lambda: evaluate.evaluate_sts(NaNFor(None), constant), "gold scores of all 2 pair(s) are equal")


@pytest.fixture
def overflowing_head(ckpt):
    """stories260K whose final norm has finite but huge weights (3e38): h = norm(x) overflows fp32 in
    some dimension for any text, so the LM head gives inf / NaN logits."""
    edit_tensor(ckpt / "model.safetensors", "model.norm.weight", lambda t: t.fill_(3e38))
    return ckpt


def test_lm_head_that_overflows_is_named(overflowing_head, tmp_path, capsys):
    emb = model.Embedder.from_pretrained(overflowing_head)
    texts = ["Lily saw a ball.", "A dog ran."]
    raises(targets.TargetsError, lambda: targets.background_logits(emb, texts), "background logits", "text 0",
           "NaN or infinite")
    raises(targets.TargetsError, lambda: targets.precompute_model_derived(emb, texts, torch.zeros(512), 0.1),
           "stage-2 targets", "NaN or infinite")
    raises(targets.TargetsError, lambda: targets.top_tokens(emb, texts, 10, f"inspect --model {overflowing_head}"),
           f"inspect --model {overflowing_head}", "text 0")
    # training: the loop's own check of the loss stops at the first step (nothing added per step)
    with pytest.raises(t2t.TrainError, match="non-finite loss or gradient at step 1"):
        train_tiny_run(tmp_path, "--model", overflowing_head)


# -----------------------------------------------------------------------------
# Names mteb accepts (mteb 2.x, mteb/models/model_meta.py: ModelMeta._check_name needs a "/")


@pytest.mark.parametrize("name, ok", [("local/stories260K", True), ("text2token/stage1", True), ("a/b/c", True),
                                      ("/", True), ("stories260K", False), ("", False), (None, False), (5, False)])
def test_model_name_rule(tmp_path, name, ok):
    scores = {"main_score": 0.5}
    if ok:
        evaluate.check_model_name(name)
        path = evaluate.write_mteb_result("T", scores, tmp_path, name, "r")
        assert path.parent.parent.name == name.replace("/", "__")
        assert evaluate.MTEBAdapter(NaNFor(None), evaluate.model_meta(name, "r")).meta["name"] == name
        return
    raises(evaluate.EvalError, lambda: evaluate.write_mteb_result("T", scores, tmp_path, name, "r"), "organization/name")
    raises(evaluate.EvalError, lambda: evaluate.MTEBAdapter(NaNFor(None), {"name": name}), repr(name))
    raises(evaluate.EvalError, lambda: evaluate.model_meta(name, "r"), "organization/name")
    assert not any(tmp_path.iterdir())


def test_result_folder_as_mteb_writes_it(tmp_path):
    path = evaluate.write_mteb_result("T", {"main_score": 0.5}, tmp_path, "local/my model", "r")
    assert path.parent.parent.name == "local__my_model"  # mteb's model_name_as_path: "/" -> "__", " " -> "_"


def test_checkpoint_folders_are_named_local(tmp_path):
    args = evaluate.parse_args(["--model", str(STORIES)])
    _, name, revision, meta = evaluate.load_encoder(STORIES, args)
    assert name == "local/stories260K"
    evaluate.check_model_name(name)


def test_mteb_agrees_with_our_name_rule():
    pytest.importorskip("mteb")
    from mteb.models import ModelMeta
    unknown = dict(loader=None, revision=None, release_date=None, languages=None, n_parameters=None,
                   memory_usage_mb=None, max_tokens=None, embed_dim=None, license=None, open_weights=None,
                   public_training_code=None, public_training_data=None, framework=["PyTorch"],
                   similarity_fn_name=None, use_instructions=None, training_datasets=None)
    for name in ["local/stories260K", "a/b/c", "/", "stories260K", ""]:
        try:
            evaluate.check_model_name(name)
            ours = True
        except evaluate.EvalError:
            ours = False
        try:
            ModelMeta(name=name, **unknown)
            theirs = True
        except ValueError:  # pydantic's ValidationError
            theirs = False
        assert ours == theirs, name


# -----------------------------------------------------------------------------
# Command lines: every project error is one line and exit status 2


def run_cli(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_errors_of_every_type_are_one_line(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(WIKI.read_text().splitlines()[:16]) + "\n")
    bad_targets = tmp_path / "t.safetensors"
    bad_targets.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    bad_sts = tmp_path / "sts.tsv"
    bad_sts.write_bytes(b"sentence1\tsentence2\tscore\na\tb\t1\nc\x00\td\t2\n")
    cases = [  # (argv, the error type's message)
        ([ROOT / "t2t.py", "train", "--data", data, "--out", tmp_path / "r1", "--targets", bad_targets,
          "--max-steps", 1], f"{bad_targets}: not a readable safetensors file"),  # TargetsError
        ([ROOT / "t2t.py", "train", "--data", data, "--out", tmp_path / "r2", "--max-steps", 1, "--eval-every", 1,
          "--eval-data", bad_sts, "--batch-size", 8], f"{bad_sts}:3: NUL byte"),  # EvalError
        ([ROOT / "evaluate.py", "--tasks", bad_sts, "--output", tmp_path / "out"], f"{bad_sts}:3: NUL byte"),
    ]
    for argv, message in cases:
        out = run_cli(*argv)
        assert out.returncode == 2, out.stderr
        assert f"error: {message}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
