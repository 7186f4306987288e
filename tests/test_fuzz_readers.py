"""Property-based fuzzing of every reader of a file: a valid file is mutated (truncated at a random
byte, random bits flipped, random or hostile bytes inserted, a byte range deleted, a JSON value
replaced by random JSON or a key deleted) and read. The reader must either read it (and what it
returns must hold its invariants) or raise the project's own error (model.ModelError,
targets.TargetsError, evaluate.EvalError, t2t.TrainError) with the mutated file's path in the
message: never a library traceback, never another error type.

A short run per reader is in the default suite (derandomized: the same inputs every time); the
long run is marked slow (`--runslow`). The number of inputs per reader, and how many were read
or refused, is printed at the end of the module (`-s`) and written as JSON to the path in
$T2T_FUZZ_REPORT when that is set (one object per run, keyed by run length and reader).
"""

import codecs
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import config  # noqa: E402
import evaluate  # noqa: E402
import model  # noqa: E402
import t2t  # noqa: E402
import targets  # noqa: E402
import tokenizer  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
STS_TEST = ROOT / "data" / "stsbenchmark" / "sts-test.csv"
SAMPLES = ["Lily saw a big red ball.", "", "a </s> b <s> <unk>", "日本語 x\n\ty"]
SHORT = dict(cheap=120, costly=30)  # examples per reader in the default suite (costly: a model load each)
LONG = dict(cheap=3000, costly=600)  # with --runslow
COUNTS = {}  # run length -> reader -> Counter(read=..., refused=...)

# bytes a hostile or corrupted file may hold: encodings, line ends, JSON syntax, special tokens,
# numbers that overflow, a 4301-digit integer (past Python's int-to-str limit), deep nesting
HOSTILE = [b"\x00", codecs.BOM_UTF8, b"\r", b"\r\n", b"\n", "\u2028".encode(), b"\t", b'"', b",", b"\\",
           b"\xff", b"\xc3", b"\xed\xa0\x80", b"{", b"}", b"[", b"]", b"[" * 3000, b"</s>", b"<|endoftext|>",
           b"NaN", b"Infinity", b"-1", b"1e999", b"1" * 4301, b"null", b"true", "\ufeff".encode()]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


# -----------------------------------------------------------------------------
# Mutations


def json_paths(obj, path=()):
    """Every place in a JSON value: () is the whole value, then keys / indices down the tree."""
    yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from json_paths(v, path + (k,))


def mutate_json(draw, obj):
    """Replace one value (anywhere, the whole document included) by random JSON, or delete a key."""
    paths = list(json_paths(obj))
    path = paths[draw(st.integers(0, len(paths) - 1))]
    if not path:
        return draw(json_values)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return obj


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def mutate_json_file(draw, data):
    return dumps(mutate_json(draw, json.loads(data)))


def mutate_json_lines(draw, data):
    lines = data.decode("utf-8").split("\n")
    i = draw(st.integers(0, len(lines) - 2))  # the last "line" is the empty one after the final \n
    lines[i] = dumps(mutate_json(draw, json.loads(lines[i]))).decode("utf-8")
    return "\n".join(lines).encode("utf-8")


HEADER_JSON = targets.HEADER_KEY  # targets.safetensors keeps a JSON header inside its metadata


def safetensors_parts(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def mutate_safetensors_header(draw, data):
    """A value of the JSON header replaced (a dtype, a shape, an offset, the metadata...)."""
    header, body = safetensors_parts(data)
    if "__metadata__" in header and HEADER_JSON in header["__metadata__"] and draw(st.booleans()):
        meta = json.loads(header["__metadata__"][HEADER_JSON])  # the JSON inside targets' metadata
        header["__metadata__"][HEADER_JSON] = json.dumps(mutate_json(draw, meta))
    else:
        header = mutate_json(draw, header)
    raw = dumps(header)
    return len(raw).to_bytes(8, "little") + raw + body


def mutate_bytes(draw, data, head=None):
    """Truncate, flip bits (in a safetensors file: in the first `head` bytes, the header, or in the
    tensor data after it, or anywhere), insert random or hostile bytes, or delete a range."""
    op = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    if op == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if op == "flip":
        out = bytearray(data)
        lo, hi = draw(st.sampled_from([(0, head), (head, len(data)), (0, len(data))])) if head else (0, len(data))
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    i = draw(st.integers(0, len(data)))
    if op == "insert":
        junk = draw(st.sampled_from(HOSTILE) | st.binary(min_size=1, max_size=12))
        return data[:i] + junk + data[i:]
    return data[:i] + data[i + draw(st.integers(1, 64)):]


def mutation(draw, data, kind):
    """One mutated copy of `data`; kind: "json", "jsonl", "safetensors" or "text"."""
    structured = {"json": mutate_json_file, "jsonl": mutate_json_lines,
                  "safetensors": mutate_safetensors_header}.get(kind)
    if structured and draw(st.booleans()):
        return structured(draw, data)
    head = 8 + int.from_bytes(data[:8], "little") if kind == "safetensors" else None
    return mutate_bytes(draw, data, head)


# -----------------------------------------------------------------------------
# Valid files to start from (written once per module)


def make_sharded(src, dst):
    """stories260K as two shards and an index, as transformers writes a sharded checkpoint."""
    dst.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    state = {k: t for k, t in checkpoints.read_tensors(src / "model.safetensors")}
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: state[k] for k in part}, str(dst / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, part in zip(names, halves) for k in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_lora_run(base, dst):
    """A LoRA run directory as t2t.py train writes one (meta.json + adapter.safetensors)."""
    dst.mkdir()
    m, _ = model.load(base)
    torch.manual_seed(0)
    model.add_lora(m, r=2, alpha=4, dropout=0.0, targets=["q_proj", "v_proj"])
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_lora(m, dst / "adapter.safetensors")
    meta = {"format_version": checkpoints.RUN_FORMAT, "stage": 1, "args": {"lr": 5e-5}, "seed": 0,
            "base_model": str(base), "base_model_given": str(base), "init": None,
            "lora": {"r": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]},
            "embedding": {"attention": "bidirectional", "pooling": "mean", "prompt": None, "max_length": 32}}
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))


def make_beir(folder):
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "title": "Title one", "text": "cats purr"}, {"_id": "d2", "title": "", "text": "dogs"},
            {"_id": 3, "text": "birds sing"}]
    queries = [{"_id": "q1", "text": "pets"}, {"_id": "q2", "text": "birds"}, {"_id": "q3", "text": "none"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\t3\t0\n",
                                               encoding="utf-8")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = root / "ckpt"
    shutil.copytree(STORIES, ckpt)
    (ckpt / checkpoints.SETTINGS_FILE).write_text(json.dumps({"attention": "causal", "pooling": "last", "max_length": 64,
                                                        "prompt": model.PROMPT_EOL}))
    make_sharded(STORIES, root / "sharded")
    make_lora_run(ckpt, root / "run")
    tok = tokenizer.Tokenizer.from_dir(STORIES)
    texts = STS_TEST.read_text(encoding="utf-8").splitlines()[:6]
    ids, w, _ = targets.precompute_data_driven([t.split("\t")[5] for t in texts], tok, 32, k=8)
    targets.save_targets(root / "targets.safetensors", ids, w, {"kind": "data-driven", "k": 8})
    rows = [t.split("\t") for t in texts]
    (root / "stsb.csv").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (root / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{r[5]}\t{r[6]}\t{r[4]}\n" for r in rows), encoding="utf-8")
    (root / "sts.csv").write_text("sentence1,sentence2,score\n" + "".join(
        f'"{r[5]}","{r[6]}",{r[4]}\n' for r in rows), encoding="utf-8")
    (root / "sts.jsonl").write_text("".join(json.dumps({"sentence1": r[5], "sentence2": r[6], "score": float(r[4])})
                                            + "\n" for r in rows), encoding="utf-8")
    make_beir(root / "beir")
    (root / "texts.txt").write_text("".join(r[5] + "\n" for r in rows) + "\n  \n", encoding="utf-8")
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": r[5]}) + "\n" for r in rows), encoding="utf-8")
    return root


# -----------------------------------------------------------------------------
# Readers: what is read, how, and what a successful read must give


def check_model(out):
    m, tok = out if isinstance(out, tuple) else (out.model, out.tokenizer)
    assert all(config.all_finite(p) for p in m.parameters())
    assert tok.encode(SAMPLES)


def check_tokenizer(tok):
    for ids in tok.encode(SAMPLES):
        assert all(isinstance(i, int) for i in ids)


def read_tokenizer(root):
    tok = tokenizer.Tokenizer.from_dir(root / "ckpt")
    tok.encode_with_prompt(SAMPLES, model.PROMPT_EOL, 40)  # the prompt's text-cutting loop too
    return tok


def check_targets(out):
    ids, w, header = out
    assert isinstance(header, dict) and torch.isfinite(w).all()


def check_sts(data):
    assert len(data.sentences1) == len(data.sentences2) == len(data.scores) > 0
    assert all(isinstance(s, str) for s in data.sentences1 + data.sentences2)
    assert torch.isfinite(torch.from_numpy(data.scores)).all()


def check_beir(data):
    assert all(isinstance(t, str) for t in data.docs + data.queries)
    assert all(isinstance(g, int) for rels in data.qrels.values() for g in rels.values())


def check_texts(texts):
    assert texts and all(isinstance(t, str) for t in texts)


# name: (file to mutate, kind, reader(root) -> value, invariant(value), expected error, cost)
READERS = {
    "config.json": ("ckpt/config.json", "json", lambda r: model.load(r / "ckpt"), check_model, model.ModelError,
                    "costly"),
    "tokenizer.json": ("ckpt/tokenizer.json", "json", read_tokenizer, check_tokenizer, model.ModelError, "cheap"),
    "tokenizer_config.json": ("ckpt/tokenizer_config.json", "json", read_tokenizer, check_tokenizer,
                              model.ModelError, "cheap"),
    "text2token.json": ("ckpt/text2token.json", "json", lambda r: model.Embedder.from_pretrained(r / "ckpt"),
                        check_model, model.ModelError, "costly"),
    "model.safetensors": ("ckpt/model.safetensors", "safetensors", lambda r: model.load(r / "ckpt"), check_model,
                          model.ModelError, "costly"),
    "model.safetensors.index.json": ("sharded/model.safetensors.index.json", "json",
                                     lambda r: model.load(r / "sharded"), check_model, model.ModelError, "costly"),
    "shard (model-00001-of-00002)": ("sharded/model-00001-of-00002.safetensors", "safetensors",
                                     lambda r: model.load(r / "sharded"), check_model, model.ModelError, "costly"),
    "run meta.json": ("run/meta.json", "json", lambda r: model.Embedder.from_run(r / "run"), check_model,
                      model.ModelError, "costly"),
    "run adapter.safetensors": ("run/adapter.safetensors", "safetensors", lambda r: model.load(r / "run"),
                                check_model, model.ModelError, "costly"),
    "targets.safetensors": ("targets.safetensors", "safetensors",
                            lambda r: targets.load_targets(r / "targets.safetensors"), check_targets,
                            targets.TargetsError, "cheap"),
    "STS Benchmark layout": ("stsb.csv", "text", lambda r: evaluate.read_sts(r / "stsb.csv"), check_sts,
                             evaluate.EvalError, "cheap"),
    "STS headed TSV": ("sts.tsv", "text", lambda r: evaluate.read_sts(r / "sts.tsv"), check_sts,
                       evaluate.EvalError, "cheap"),
    "STS headed CSV": ("sts.csv", "text", lambda r: evaluate.read_sts(r / "sts.csv"), check_sts,
                       evaluate.EvalError, "cheap"),
    "STS JSONL": ("sts.jsonl", "jsonl", lambda r: evaluate.read_sts(r / "sts.jsonl"), check_sts,
                  evaluate.EvalError, "cheap"),
    "BEIR corpus.jsonl": ("beir/corpus.jsonl", "jsonl", lambda r: evaluate.read_beir(r / "beir"), check_beir,
                          evaluate.EvalError, "cheap"),
    "BEIR queries.jsonl": ("beir/queries.jsonl", "jsonl", lambda r: evaluate.read_beir(r / "beir"), check_beir,
                           evaluate.EvalError, "cheap"),
    "BEIR qrels/test.tsv": ("beir/qrels/test.tsv", "text", lambda r: evaluate.read_beir(r / "beir"), check_beir,
                            evaluate.EvalError, "cheap"),
    "--data .txt": ("texts.txt", "text", lambda r: t2t.read_texts(r / "texts.txt"), check_texts, t2t.TrainError,
                    "cheap"),
    "--data .jsonl": ("texts.jsonl", "jsonl", lambda r: t2t.read_texts(r / "texts.jsonl"), check_texts,
                      t2t.TrainError, "cheap"),
}


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: the counts per reader, printed and (with $T2T_FUZZ_REPORT) written as JSON."""
    yield
    if not COUNTS:
        return
    print("\nfuzzed inputs per reader (read / refused with the project's error / other exceptions: 0):")
    for length, readers in COUNTS.items():
        for name, c in readers.items():
            print(f"  [{length}] {name}: {c['read'] + c['refused']} inputs, {c['read']} read, {c['refused']} refused")
    if os.environ.get("T2T_FUZZ_REPORT"):
        out = {length: {name: dict(c, inputs=c["read"] + c["refused"]) for name, c in readers.items()}
               for length, readers in COUNTS.items()}
        Path(os.environ["T2T_FUZZ_REPORT"]).write_text(json.dumps(out, indent=2) + "\n")


@pytest.mark.parametrize("length", ["short", pytest.param("long", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(READERS))
def test_reader_fails_cleanly(files, name, length, capsys):
    rel, kind, read, invariant, error, cost = READERS[name]
    path = files / rel
    original = path.read_bytes()
    counts = COUNTS.setdefault(length, {}).setdefault(name, Counter(read=0, refused=0))

    @settings(max_examples=(SHORT if length == "short" else LONG)[cost], derandomize=length == "short",
              database=None, deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data):
        mutated = mutation(data.draw, original, kind)
        path.write_bytes(mutated)
        try:
            value = read(files)
        except error as e:
            assert str(path) in str(e), f"the message does not name {path}: {e}"
            counts["refused"] += 1
        else:
            invariant(value)
            counts["read"] += 1
        finally:
            path.write_bytes(original)
            capsys.readouterr()  # read_texts reports blank lines on stdout

    fuzz()
