"""`t2t.py export --format sentence-transformers` (export_st.py): SentenceTransformer(folder).encode
must give our Embedder's embeddings (cosine >= 0.9999 per text), with sentence-transformers and
transformers as the references, for every family in both attentions, both poolings, PromptEOL, texts
cut at max length, the bundled model and a run on a GGUF base; and what cannot be expressed is refused.
"""

import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

import checkpoints  # noqa: E402
import export_st  # noqa: E402
import model  # noqa: E402
import hf_reference as ref  # noqa: E402
import t2t  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
STORIES_GGUF = STORIES / "stories260K.gguf"
WIKI = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"
MIN_COSINE = 0.9999  # the bar: same tokens and the same network, fp32 rounding apart
MAX_LENGTH = 64  # small, so that the long texts below are cut (and PromptEOL's tail must survive the cut)


def texts():
    wiki = WIKI.read_text().splitlines()
    return (["A man is playing a guitar.", "Short one.", "x", "Quotes \"inside\" and 'out', numbers 3.14.",
             "Unicode: café, naïve, 東京."] + wiki[:6] + [" ".join(wiki[6:10])])  # the last ~100 tokens long


@pytest.fixture(scope="module")
def st():
    pytest.importorskip("transformers")
    return pytest.importorskip("sentence_transformers")


def export(model, out, *flags):
    t2t.main(["export", "--format", "sentence-transformers", "--model", str(model), "--out", str(out), *flags])
    return out


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same_embeddings(st, folder, ours, batch_size=4, tokenizer_as_is=False):
    """SentenceTransformer(folder) against our Embedder, per text; batches mix lengths (padding).
    tokenizer_as_is: the folder's tokenizer.json as it is (transformers 5 builds Qwen's own tokenizer
    class for a qwen2/qwen3 config, which the tiny checkpoints' SentencePiece tokenizer is not)."""
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    if tokenizer_as_is:
        from transformers import PreTrainedTokenizerFast
        theirs[0].processor = PreTrainedTokenizerFast.from_pretrained(str(folder))
    sample = texts()
    if ours.prompt is not None:  # texts cut inside a prompt: see test_prompted_texts_cut_at_max_length
        sample = [t for t, (ids, _) in zip(sample, ours.tokenizer.encode_with_prompt(sample, ours.prompt))
                  if len(ids) <= ours.max_length]
        assert len(sample) >= 5
    want = ours.encode(sample, batch_size=batch_size)
    got = theirs.encode(sample, batch_size=batch_size, convert_to_numpy=True)
    assert got.shape == want.shape
    cos = cosines(got, want)
    assert cos.min() >= MIN_COSINE, dict(zip(sample, cos.round(6)))
    # a test that can fail: the other attention (or pooling) is far from these embeddings
    return cos


SETTINGS = [("bidirectional", "mean"), ("causal", "mean"), ("causal", "last"), ("bidirectional", "last")]


@pytest.mark.parametrize("attention,pooling", SETTINGS)
def test_bundled_model_round_trips(st, tmp_path, attention, pooling):
    flags = ["--attention", attention, "--pooling", pooling, "--max-length", str(MAX_LENGTH)]
    folder = export(STORIES, tmp_path / "st", *flags)
    ours = model.Embedder.from_pretrained(STORIES, pooling=pooling, attention=attention, max_length=MAX_LENGTH)
    assert_same_embeddings(st, folder, ours)
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"]
    pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_" + {"mean": "mean_tokens", "last": "lasttoken"}[pooling]] is True
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_LENGTH
    card = (folder / "README.md").read_text()
    assert f"Attention: {attention}" in card and f"Pooling: {pooling}" in card and "SentenceTransformer(" in card


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("attention,pooling", [("bidirectional", "mean"), ("causal", "last")])
def test_every_family_round_trips(st, tmp_path, family, attention, pooling):
    base = ref.make_tiny_checkpoint(tmp_path / "base", family)
    folder = export(base, tmp_path / "st", "--attention", attention, "--pooling", pooling,
                    "--max-length", str(MAX_LENGTH))
    ours = model.Embedder.from_pretrained(base, pooling=pooling, attention=attention, max_length=MAX_LENGTH)
    assert_same_embeddings(st, folder, ours, tokenizer_as_is=family.startswith("qwen"))
    config = json.loads((folder / "config.json").read_text())
    if attention == "bidirectional":  # the switch transformers reads, per family
        key = "use_bidirectional_attention" if family == "gemma3" else "is_causal"
        assert config[key] is (family == "gemma3")
    # the switch matters: the other attention gives other embeddings (so the comparison can fail)
    other = model.Embedder.from_pretrained(base, pooling=pooling, max_length=MAX_LENGTH,
                                                 attention="causal" if attention == "bidirectional" else "bidirectional")
    assert cosines(other.encode(texts()), ours.encode(texts())).min() < MIN_COSINE


def train_run(tmp_path, model, *extra):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(WIKI.read_text().splitlines()[:16]) + "\n")
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    argv = ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "8",
            "--max-steps", "2", "--lora-r", "4", "--lr", "1e-2", "--lora-dropout", "0", *extra]
    return t2t.train(t2t.apply_preset(p.parse_args(argv), argv))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_gguf_based_run_round_trips(st, tmp_path, pooling):
    """A LoRA run on the bundled GGUF file: the folder holds the merged weights, the run's settings
    (max length from the run) and a model card naming the base, the recipe and the scores."""
    run = train_run(tmp_path, STORIES_GGUF, "--pooling", pooling, "--max-length", str(MAX_LENGTH))
    results = tmp_path / "results"
    import evaluate
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps(dict(sentence1=a, sentence2=b, score=s)) + "\n" for a, b, s in
                           [("A man plays.", "A man is playing.", 4.5), ("A cat.", "The stock market fell.", 0.2),
                            ("Kids run.", "Children are running.", 4.0)]))
    evaluate.main(["--model", str(run), "--tasks", str(sts), "--output", str(results)])
    folder = export(run, tmp_path / "st", "--results", str(results))
    ours = model.Embedder.from_run(run)
    assert ours.max_length == MAX_LENGTH and ours.pooling == pooling
    assert_same_embeddings(st, folder, ours)
    card = (folder / "README.md").read_text()
    assert "stories260K.gguf" in card and "stage 1" in card and "| sts" in card, card
    # evaluate.py scores the folder as it scores the run (no run directory needed)
    enc, name, revision, meta = evaluate.load_encoder(folder, Namespace(
        device="cpu", dtype="float32", attention=None, pooling=None, max_length=None, similarity="cosine",
        compile=False))
    assert (enc.pooling, enc.causal, enc.max_length, enc.prompt) == (ours.pooling, ours.causal, ours.max_length,
                                                                        ours.prompt)
    assert cosines(enc.encode(texts()), ours.encode(texts())).min() >= MIN_COSINE


def test_mean_pooling_with_a_prompt_is_refused(tmp_path):
    with pytest.raises(export_st.ExportError, match="averages only the text's own tokens.*--format hf"):
        export(STORIES, tmp_path / "st", "--pooling", "mean", "--prompt", "query: {text}")
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())  # nothing written


def test_a_tokenizer_that_appends_eos_is_refused(tmp_path):
    base = ref.make_tiny_checkpoint(tmp_path / "base", "llama")
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(cfg | {"add_eos_token": True}))
    with pytest.raises(export_st.ExportError, match=r"appends \['</s>'\].*--format hf"):
        export(base, tmp_path / "st")


def test_prompt_template_keeps_any_prompt_text():
    """The chat template spells the prompt as Jinja literals: quotes, backslashes, newlines and any
    script come back as written (rendered with jinja2, transformers' template engine)."""
    jinja2 = pytest.importorskip("jinja2")
    prompt = 'Q\\ \'x\' "y"\n東京 🙂 {text} end:"'
    template = export_st.prompt_template(prompt, ["<s>"])
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers compiles templates
    for content in ("hello", [{"type": "text", "text": "hello"}]):
        got = env.from_string(template).render(messages=[{"role": "user", "content": content}])
        assert got == "<s>" + prompt.replace("{text}", "hello")


def test_prompted_texts_cut_at_max_length(st, tmp_path):
    """A text longer than max length inside PromptEOL: both keep the whole prompt, but where the cut
    falls differs by a token: sentence-transformers cuts the token sequence and writes the template's
    tail back, ours cuts the text and tokenizes the prompt again (a space left at the cut merges with
    the closing quote). The documented difference of a prompted export (export_st.py, model card)."""
    folder = export(STORIES, tmp_path / "st", "--pooling", "last", "--max-length", str(MAX_LENGTH))
    ours = model.Embedder.from_pretrained(STORIES, pooling="last", max_length=MAX_LENGTH)
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    tail = ours.tokenizer.encode_with_prompt(["x"], ours.prompt)[0][0][-7:]  # ' means in one word:"'
    cut = [t for t, (ids, _) in zip(texts(), ours.tokenizer.encode_with_prompt(texts(), ours.prompt))
           if len(ids) > MAX_LENGTH]  # (uncut)
    assert cut
    for text in cut:
        got = theirs[0].preprocess([text])["input_ids"][0].tolist()
        want = ours.tokenize([text])[0][0].tolist()
        assert len(got) == MAX_LENGTH and got[-7:] == tail and want[-7:] == tail
        same = next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-2])) if a != b)
        assert same >= len(want) - 8 - 8, (got, want)  # the same up to the last few text tokens before the tail
