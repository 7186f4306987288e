"""A special token spelled inside a text ("</s>", "<s>", "<unk>", "<|endoftext|>", "<|im_start|>")
is text: it is tokenized as the characters it is, in the model input (Tokenizer.encode and
encode_with_prompt, which the Embedder, training and evaluation use) and in stage-1 targets; BOS
and EOS come only from the post-processor.

The reference is independent of the code under test: the same tokenizer.json with its added
tokens removed, so that nothing can match a special token and its text can only be spelled by the
vocabulary's pieces (and, for Qwen, transformers' own `split_special_tokens=True`). Tokenizers:
the bundled stories260K, Mistral-7B-Instruct-v0.2's tokenizer.json, and Qwen2.5's vocab.json +
merges.txt (built into a tokenizer.json by transformers, as tests/test_model.py does).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import model  # noqa: E402
import targets  # noqa: E402
import tokenizer  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
MISTRAL = TESTS / "fixtures" / "configs" / "Mistral-7B-Instruct-v0.2"
QWEN = TESTS / "fixtures" / "configs" / "Qwen2.5-7B-Instruct"
POISONED = ["Once upon a time </s> there was <s> a girl", "</s>", "<s>", "<unk><unk>", "end.</s><s>start",
            "a<|endoftext|>b", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>"]


def without_added_tokens(tokenizer_json: Path) -> HFTokenizer:
    """The same tokenizer with no added tokens: a special token's text can only be spelled by pieces."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(spec))


def spelled(plain: HFTokenizer, text: str) -> list[int]:
    return plain.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("folder", [STORIES, MISTRAL], ids=["stories260K", "Mistral-7B-Instruct-v0.2"])
def test_special_tokens_in_text_are_text(folder):
    tok = tokenizer.Tokenizer.from_dir(folder)
    plain = without_added_tokens(folder / "tokenizer.json")
    assert tok.special_ids == {0, 1, 2} and (tok.bos_id, tok.eos_id) == (1, 2)  # <unk> <s> </s>, as before
    for text in POISONED:
        expected = spelled(plain, text)
        assert expected and not set(expected) & tok.special_ids, text  # the reference spells characters
        assert tok.encode([text], add_special_tokens=False)[0] == expected, text
        assert tok.encode([text])[0] == [tok.bos_id] + expected, text  # BOS from the template, once
        assert tok.decode(expected).strip() == text.strip(), text  # and they are the text's characters


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Qwen2.5's published vocab.json + merges.txt, saved as tokenizer.json by transformers."""
    transformers = pytest.importorskip("transformers")
    src, out = tmp_path_factory.mktemp("qwen_src"), tmp_path_factory.mktemp("qwen")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(QWEN / f, src / f)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    hf.save_pretrained(out)
    return hf, out


# Qwen's byte-level BPE pieces of two poisoned texts, worked out from vocab.json and merges.txt
# (no merge joins "<" and "|"; "Ċ" is the byte-level newline); their ids are looked up in vocab.json.
QWEN_PIECES = {"<|endoftext|>": ["<", "|", "endo", "ft", "ext", "|", ">"],
               "<|im_start|>user\nhi<|im_end|>": ["<", "|", "im", "_start", "|", ">", "user", "Ċ", "hi",
                                                  "<", "|", "im", "_end", "|", ">"]}


def test_qwen_special_tokens_in_text_are_text(qwen):
    hf, folder = qwen
    tok = tokenizer.Tokenizer.from_dir(folder)
    assert {151643, 151644, 151645} <= tok.special_ids  # <|endoftext|> <|im_start|> <|im_end|>
    assert (tok.eos_id, tok.pad_id) == (151645, 151643)
    vocab = json.loads((QWEN / "vocab.json").read_text(encoding="utf-8"))
    for text, pieces in QWEN_PIECES.items():
        assert tok.encode([text])[0] == [vocab[p] for p in pieces], text  # Qwen adds no BOS
    for text in POISONED:
        ids = tok.encode([text])[0]
        assert ids == hf(text, split_special_tokens=True)["input_ids"], text  # transformers agrees
        assert not set(ids) & tok.special_ids, text
    assert hf("<|endoftext|>")["input_ids"] == [151643]  # what the old behaviour gave: the control token


def test_prompt_and_embedder_input_keep_special_text_as_text():
    m, tok = model.load(STORIES)
    plain = without_added_tokens(STORIES / "tokenizer.json")
    last = model.Embedder(m, tok, "last")  # the PromptEOL prompt
    text = "Lily said </s> and <s> then <unk>"
    (ids, mask), = tok.encode_with_prompt([text], last.prompt)
    assert ids == [1] + spelled(plain, last.prompt.replace("{text}", text))  # BOS, then characters
    assert tok.decode([i for i, k in zip(ids, mask) if k]).strip() == text  # the pieces of </s> are the text's
    for emb in (last, model.Embedder(m, tok, "mean")):
        input_ids, attention, pool = emb.tokenize([text, "</s>"])
        real = input_ids[attention]
        assert (real == 1).sum() == 2 and not ((real == 0) | (real == 2)).any()  # only the two BOS
    (ids, mask), = tok.encode_with_prompt(["</s>"], None)
    assert ids == [1] + spelled(plain, "</s>") and all(mask)


def test_evaluation_feeds_special_text_as_text(tmp_path, monkeypatch):
    """evaluate.py -> Embedder.encode -> encode_with_prompt: no control token reaches the model."""
    m, tok = model.load(STORIES)
    emb = model.Embedder(m, tok, "mean", max_length=64)
    seen, real_encode = [], tok.encode_with_prompt

    def recording(texts, prompt=None, max_length=None):
        out = real_encode(texts, prompt, max_length)
        seen.extend(out)
        return out

    monkeypatch.setattr(tok, "encode_with_prompt", recording)
    sts = tmp_path / "poisoned.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in [
        ("a </s> b", "a b", 3.0), ("<s><s>", "</s>", 1.0), ("<unk> x", "x", 2.0)]), encoding="utf-8")
    scores = evaluate.evaluate_sts(emb, sts, batch_size=2)
    assert np.isfinite(scores["main_score"]) and len(seen) == 6
    for ids, _ in seen:
        assert ids[0] == 1 and not {0, 1, 2} & set(ids[1:]), ids


def test_stage1_target_of_a_text_that_spells_a_special_token():
    """Stage-1 targets tokenize the text's content words (targets.encode_content). A special token
    whose text survives the word filter (here "Lily", made special) must still count as the word."""
    spec = json.loads((STORIES / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 512, "content": "Lily", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    special = tokenizer.Tokenizer(HFTokenizer.from_str(json.dumps(spec)), config, where="Lily-special")
    ordinary = tokenizer.Tokenizer.from_dir(STORIES)
    assert 512 in special.special_ids
    for text in ["Lily saw a big red ball.", "The dog and Lily ran", "</s> Lily <s>"]:
        got = targets.data_driven_target(text, special)[0].tolist()
        assert got == targets.data_driven_target(text, ordinary)[0].tolist(), text
        assert got and 512 not in got
    # the real special tokens are punctuation: the word filter removes their brackets anyway
    assert targets.content_words("a </s> b <|endoftext|> c") == "b endoftext c"
