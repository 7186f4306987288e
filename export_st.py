"""Export an embedder as a sentence-transformers folder: `t2t.py export --format sentence-transformers`.

The folder is an HF checkpoint (checkpoints.save_hf: merged weights, config.json, tokenizer files,
text2token.json) plus the files sentence-transformers reads (its documented layout, as published
embedding checkpoints such as EmbeddingGemma and gte-Qwen2 use it): modules.json (a Transformer at
the folder's root, then 1_Pooling), sentence_bert_config.json (max_seq_length), 1_Pooling/config.json
(mean or last token), config_sentence_transformers.json, and a README.md model card.

How each embedding setting of model.Embedder is expressed, so that SentenceTransformer(folder).encode
gives Embedder.encode (tests/test_export_st.py):
- attention: causal is the families' default. Bidirectional is a config.json switch that
  transformers reads: Gemma 3's use_bidirectional_attention (its symmetric sliding band, as ours),
  and for Llama, Mistral and Qwen2/3 `is_causal: false` (transformers >= 5.2 turns the causal
  mask into a padding-only one for any decoder; older versions ignore the key).
- pooling: mean over the attention mask (BOS included, as ours without a prompt) or the last real
  token (sentence-transformers finds it from the mask, so right padding is fine).
- prompt (last pooling: PromptEOL by default): its text sits in the middle of the template, which a
  sentence-transformers prompt (a prefix) cannot say; so it is the tokenizer's chat template, which
  sentence-transformers (>= 6) applies to plain texts. When a text is cut to max_seq_length, it puts
  the template's tail back ("restore_suffix"), as our Tokenizer.encode_with_prompt cuts the text and
  never the prompt.

Differs, and said so (a WARNING at export, the model card): a prompted text longer than max length.
Both keep the whole prompt, but sentence-transformers cuts the token sequence and writes the template's
tail back, while ours cuts the text and tokenizes the prompt again, so the tokens at the cut can
differ (a space left at the cut merges with the closing quote; a character spelled in several byte
tokens is kept in part or dropped). Texts that fit max length give the same tokens.

Refused, with the reason (ExportError): mean pooling with a prompt (sentence-transformers averages
either every token or, with a prefix prompt, those after it; ours averages the text's tokens inside
the template), and tokenizers that append a token (EOS) after the text (transformers keeps it when
it truncates, we cut it).

Not included: a Normalize module (Embedder.encode does not normalise), ONNX/OpenVINO files, quantised weights.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from checkpoints import base_checkpoint_dir, is_gguf, is_run_dir, read_run_meta, save_hf, weights_sha256
from files import read_json, write_atomic
from model import ModelError

ST_LAYOUT = "6.3.0"  # the sentence-transformers version whose folder layout this follows (and the tests use)
MIN_VERSIONS = {  # what reading the folder needs, per feature (stated in the model card)
    "chat_template": ("sentence-transformers", "6.0"),  # chat templates applied to plain texts, suffix restore
    "is_causal": ("transformers", "5.2"),  # config.is_causal=False -> bidirectional mask for any decoder
    "use_bidirectional_attention": ("transformers", "4.56.2"),  # Gemma 3
}


class ExportError(ModelError):
    """An embedder that a sentence-transformers folder would not reproduce."""


# -----------------------------------------------------------------------------
# What the folder says, per setting


def attention_switch(model_type: str, causal: bool) -> dict:
    """config.json keys that make transformers attend as we do: {} for causal attention."""
    if causal:
        return {}
    if model_type in ("gemma3_text", "gemma3"):
        return {"use_bidirectional_attention": True}
    return {"is_causal": False}


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer's post-processor puts before and after a text (e.g. [BOS], [])."""
    ids = tokenizer.encode(["x"])[0]
    plain = tokenizer.encode(["x"], add_special_tokens=False)[0]
    start = next(i for i in range(len(ids) - len(plain) + 1) if ids[i: i + len(plain)] == plain)
    return ids[:start], ids[start + len(plain):]


def jinja_literal(s: str) -> str:
    """A Jinja string literal for s: printable ASCII kept, anything else as a \\U escape (Jinja
    unescapes literals like Python), so the prompt survives quotes, newlines and any script."""
    return "'" + "".join(c if 32 <= ord(c) < 127 and c not in "\\'" else f"\\U{ord(c):08x}" for c in s) + "'"


PROBES = ["A man is playing a guitar.", "x", "", "Unicode: café, 東京 🙂", "  spaced  "]  # checked at export


def chat_template_for(emb, head: list[int]) -> str:
    """The chat template that gives, for the PROBES texts, the ids our tokenizer gives the prompted
    text (apply_chat_template tokenizes the rendered string without the post-processor, reading the
    specials spelled in it). A SentencePiece-style tokenizer (the bundled one) gives the text after
    <s> no prefix space, so a space is tried after the specials; anything else is refused."""
    tok = emb.tokenizer
    hf = HFTokenizer.from_str(tok.tok.to_str())  # a copy: specials spelled in the text are read as specials
    hf.encode_special_tokens = False
    want = [ids for ids, _ in tok.encode_with_prompt(PROBES, emb.prompt)]
    heads = [tok.tok.id_to_token(i) for i in head]
    for sep in ("", " ") if heads else ("",):
        template = prompt_template(emb.prompt, heads, sep)
        rendered = [render(template, text) for text in PROBES]
        if [e.ids for e in hf.encode_batch(rendered, add_special_tokens=False)] == want:
            return template
    raise ExportError(f"{tok.where}: no chat template gives this tokenizer's ids for the prompt {emb.prompt!r} "
                      f"(apply_chat_template tokenizes without the post-processor); export with --format hf")


def render(template: str, text: str) -> str:
    """What transformers renders (its Jinja settings), for a one-message conversation."""
    import jinja2  # transformers' template engine; a dependency of torch, so always here
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": text}])


def prompt_template(prompt: str, head_tokens: list[str], sep: str = "") -> str:
    """A chat template that renders a one-message conversation as our tokenizer sees a prompted text:
    the post-processor's leading specials (apply_chat_template tokenizes without them), the prompt's
    text before {text}, the message, the rest. The message content is a string ("flat" format) or a
    list of {"type": "text", "text": ...} parts ("structured")."""
    before, after = prompt.split("{text}", 1)
    content = ("{%- set c = messages[-1]['content'] -%}"
               "{%- if c is string -%}{{ c }}{%- else -%}{{ c | map(attribute='text') | join('') }}{%- endif -%}")
    return ("".join("{{ " + jinja_literal(t) + " }}" for t in head_tokens) + "{{ " + jinja_literal(sep + before) + " }}"
            + content + "{{ " + jinja_literal(after) + " }}")


def check_exportable(emb):
    """Refuse an embedder that sentence-transformers would embed differently, saying why and what to use."""
    if emb.pooling == "mean" and emb.prompt is not None:
        raise ExportError(
            f"mean pooling with the prompt {emb.prompt!r} cannot be exported to sentence-transformers: it averages "
            f"every token (or those after a prefix prompt), while this embedder averages only the text's own "
            f"tokens inside the prompt; export with --format hf and load it with Embedder.from_pretrained, or "
            f"export without a prompt")
    head, tail = special_ends(emb.tokenizer)
    if tail:
        raise ExportError(
            f"{emb.tokenizer.where}: the tokenizer appends {[emb.tokenizer.tok.id_to_token(i) for i in tail]} after "
            f"each text; transformers keeps it when it truncates a long text and this embedder cuts it, so long "
            f"texts would embed differently in sentence-transformers; export with --format hf")
    return head


# -----------------------------------------------------------------------------
# Writing the folder


def save_sentence_transformers(emb, base_dir, out_dir, card: dict, dtype=None) -> Path:
    """Write `emb` (an Embedder with merged weights) as a sentence-transformers folder in out_dir;
    card: what the model card says (model_card: base model, recipe, settings, scores)."""
    head = check_exportable(emb)
    out_dir = save_hf(emb.model, base_dir, out_dir, emb.settings(), dtype=dtype)
    args = emb.model.args

    config = read_json(out_dir / "config.json")
    config.update(attention_switch(config.get("model_type", args.model_type), emb.causal))
    write_json(out_dir / "config.json", config)

    # tokenizer: our max length, and the prompt as a chat template (or none, so that texts stay texts)
    tok_cfg_file = out_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_file) if tok_cfg_file.is_file() else {}
    tok_cfg.pop("chat_template", None)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg["model_max_length"] = emb.max_length
    # tokenizer.json as it is, as ours reads it: transformers' family classes (LlamaTokenizerFast)
    # rebuild the pre-tokenizer, which changes how text after a special token (<s>This) splits
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # batches need a pad token (ours: the checkpoint's, else EOS, else id 0; the mask hides it)
    if tok_cfg.get("pad_token") is None:
        tok_cfg["pad_token"] = emb.tokenizer.tok.id_to_token(emb.tokenizer.pad_id)
    tok_cfg["padding_side"] = "right"  # as ours; both poolings find the real tokens from the mask anyway
    if emb.prompt is not None:
        tok_cfg["chat_template"] = chat_template_for(emb, head)
        print(f"WARNING: a text longer than {emb.max_length} tokens with its prompt may be cut one token "
              f"differently in sentence-transformers (it cuts tokens and restores the prompt's tail; text2token "
              f"cuts the text); texts that fit embed the same", file=sys.stderr)
    write_json(tok_cfg_file, tok_cfg)

    write_json(out_dir / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    write_json(out_dir / "sentence_bert_config.json", transformer_config(emb))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    write_json(out_dir / "1_Pooling" / "config.json", pooling_config(emb.pooling, args.dim))
    write_json(out_dir / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": ST_LAYOUT}, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})
    write_atomic(out_dir / "README.md", lambda tmp: tmp.write_text(model_card(emb, base_dir, card, config)))
    return out_dir


def transformer_config(emb) -> dict:
    """sentence_bert_config.json: the max length, and with a prompt the "message" modality, so that
    plain texts go through the chat template (a folder without modality_config is read as text only).
    sentence-transformers before 6 refuse the key rather than embed without the prompt."""
    config = {"max_seq_length": emb.max_length, "do_lower_case": False}
    if emb.prompt is not None:
        forward = {"method": "forward", "method_output_name": "last_hidden_state"}
        config |= {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings",
                   "modality_config": {"text": forward, "message": forward | {"format": "flat"}}}
    return config


def pooling_config(pooling: str, dim: int) -> dict:
    """1_Pooling/config.json in the keys every sentence-transformers version reads."""
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    on = {"mean": "mean_tokens", "last": "lasttoken"}[pooling]
    return {"word_embedding_dimension": dim, **{f"pooling_mode_{m}": m == on for m in modes}, "include_prompt": True}


def write_json(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


# -----------------------------------------------------------------------------
# The model card


def model_card(emb, base_dir, card: dict, config: dict) -> str:
    """README.md: how to load it, the base model and its licence, the recipe, the settings, the scores."""
    needs = ["transformers>=4.45", "sentence-transformers>=3.0"]
    if "is_causal" in config:
        needs[0] = "transformers>=" + MIN_VERSIONS["is_causal"][1]
    if "use_bidirectional_attention" in config:
        needs[0] = "transformers>=" + MIN_VERSIONS["use_bidirectional_attention"][1]
    if emb.prompt is not None:
        needs[1] = "sentence-transformers>=" + MIN_VERSIONS["chat_template"][1]
    settings = emb.settings()
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, text2token]",
        *([f"license: {card['license']}"] if card.get("license") else []), "---", "",
        f"# {card.get('name', Path(base_dir).name)}", "",
        "A text embedder trained with Text2Token (unsupervised token-space targets, arXiv 2510.10224) by "
        "text2token, exported with `t2t.py export --format sentence-transformers`.", "",
        "```python", "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(\"path/to/this/folder\")",
        "embeddings = model.encode([\"A man is playing a guitar.\"])", "```", "",
        f"Needs {' and '.join(needs)} (older versions load the folder but embed differently).", "",
        "## Model", "",
        f"- Base model: `{card.get('base_model', base_dir)}` ({'GGUF file' if is_gguf(base_dir) else 'HF folder'})",
        f"- Licence of the base model: {card.get('license') or 'see the base model (not recorded in its files)'}",
        f"- Recipe: {card.get('recipe', 'untrained base model')}",
        f"- Stage: {card.get('stage', '-')}",
        f"- Embedding dimension: {emb.dim}", "",
        "## Settings", "",
        f"- Attention: {settings['attention']}"
        + (f" (config.json: {', '.join(f'{k}={json.dumps(config[k])}' for k in ('is_causal', 'use_bidirectional_attention') if k in config)})"
           if settings["attention"] == "bidirectional" else ""),
        f"- Pooling: {settings['pooling']}",
        f"- Prompt: {json.dumps(settings['prompt']) if settings['prompt'] else 'none'}"
        + (" (the tokenizer's chat template; a long text is cut, the prompt kept; at the cut, sentence-transformers"
           " may keep one token more or less than text2token's Embedder)" if settings["prompt"] else ""),
        f"- Max sequence length: {settings['max_length']} tokens, BOS and prompt included", "",
        "Texts are text: a special token's spelling inside a text (`</s>`) is read as that token by transformers'"
        " tokenizer, and as its characters by text2token's.", "",
    ]
    for key, value in card.get("training", {}).items():
        lines.insert(lines.index("## Settings") + 2, f"- Training {key}: {value}")
    scores = card.get("scores") or {}
    if scores:
        lines += ["## Scores (text2token's evaluate.py, MTEB metrics)", "", "| task | main score | metric |", "|---|---|---|"]
        lines += [f"| {task} | {s['main_score']:.4f} | {s.get('metric', '')} |" for task, s in sorted(scores.items())]
        lines.append("")
    return "\n".join(lines)


def base_licence(base_dir) -> str | None:
    """The licence the base model's files state: a README's `license:` front matter, or GGUF
    metadata general.license (read by gguf_file)."""
    if is_gguf(base_dir):
        import gguf_file
        return gguf_file.read_gguf(base_dir).metadata.get("general.license")
    readme = Path(base_dir) / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines()[1:40]:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or None
            if line.strip() == "---":
                break
    return None


def read_scores(results_dir, model_name, revision) -> dict:
    """{task: {main_score, metric}} from evaluate.py's result files for this model and revision, if any."""
    folder = Path(results_dir) / model_name.replace("/", "__") / revision
    scores = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if f.name == "model_meta.json":
            continue
        data = read_json(f)
        for split, rows in (data.get("scores") or {}).items():
            main = rows[0]["main_score"] if rows and isinstance(rows[0], dict) and "main_score" in rows[0] else None
            if main is not None:
                scores[f"{data.get('task_name', f.stem)} ({split})"] = {
                    "main_score": main, "metric": next((k for k, v in rows[0].items() if k != "main_score" and v == main), "")}
    return scores


def card_facts(model, results_dir) -> dict:
    """What the model card says about a run or checkpoint: base model and its licence, the
    recipe (stage, LoRA or full, steps, lr, data), and evaluate.py's scores found under results_dir."""
    base = base_checkpoint_dir(model)
    card = dict(name=Path(model).resolve().name, base_model=str(base), license=base_licence(base))
    if is_run_dir(model):
        meta = read_run_meta(model)
        a = meta.get("args", {})
        card.update(stage=meta.get("stage"), recipe=(
            f"Text2Token stage {meta.get('stage')} ({'data-driven' if meta.get('stage') == 1 else 'model-derived'} "
            f"targets), {'LoRA r=%s' % meta['lora']['r'] if meta.get('lora') else 'full fine-tuning'}, "
            f"{meta.get('total_steps')} steps, lr {a.get('lr')}, {meta.get('n_texts')} texts of {a.get('data')}"))
        name = f"text2token/{Path(model).resolve().name}"  # evaluate.py's name for a run
    else:
        name = f"local/{Path(model).resolve().name}"
    card["scores"] = read_scores(results_dir, name, weights_sha256(model))
    return card
