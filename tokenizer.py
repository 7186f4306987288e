"""The tokenizer of a checkpoint: its tokenizer.json through the `tokenizers` library.

Follows transformers' PreTrainedTokenizerFast as the checkpoints use it: special tokens come from
the checkpoint's own post-processor (Llama/Mistral add BOS, Qwen adds nothing), adjusted by
tokenizer_config.json's add_bos_token / add_eos_token (LlamaTokenizerFast.update_post_processor).
A prompt template wraps the text; its tokens are marked so that pooling can leave them out.
pad_batch right-pads lists of ids into the tensors the model takes.

Dimensions: B batch, T tokens.

Not included: slow (SentencePiece) tokenizers, chat templates, padding side other than right;
GGUF files build their tokenizer in gguf_file.py.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer

from files import ModelError, read_json, read_text


class Tokenizer:
    """tokenizer.json through the `tokenizers` library. BOS/EOS come from the checkpoint's own
    post-processor (Llama/Mistral prepend BOS, Qwen adds nothing), adjusted by
    tokenizer_config.json's add_bos_token / add_eos_token when it states them.

    Texts are text: a special token spelled inside a text or a prompt ("</s>", "<|im_start|>")
    is tokenized as the characters it is, never as the control token (transformers'
    split_special_tokens=True). Special ids enter only through the post-processor (BOS/EOS)."""

    def __init__(self, tok: HFTokenizer, config: dict, where: str = "tokenizer"):
        self.tok = tok
        self.where = where  # the tokenizer.json, named in errors
        self.tok.no_truncation()
        self.tok.no_padding()
        self.tok.encode_special_tokens = True  # a corpus cannot inject BOS/EOS/chat tokens
        self.bos_id = self._token_id(config.get("bos_token"))
        self.eos_id = self._token_id(config.get("eos_token"))
        if "add_bos_token" in config or "add_eos_token" in config:
            self._set_template(config.get("add_bos_token", False), config.get("add_eos_token", False))
        # pad: the checkpoint's pad token, else EOS, else 0 (the attention mask hides it anyway)
        pad = self._token_id(config.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids |= set(self.encode([""], add_special_tokens=True)[0])
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path):
        """A folder's tokenizer.json (UTF-8, a BOM dropped; the tokenizers library parses it) and
        tokenizer_config.json when present (bos/eos/pad_token a string or null, add_bos_token /
        add_eos_token true or false); anything else is a ModelError naming the file and key."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelError(f"{file}: file not found (a checkpoint folder needs tokenizer.json)")
        text = read_text(file)  # our UTF-8 rules (a BOM dropped, bad bytes named by line)
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception on bad files
            raise ModelError(f"{file}: cannot be read by the tokenizers library: {e}") from None
        cfg_file = path / "tokenizer_config.json"
        config = read_json(cfg_file) if cfg_file.is_file() else {}
        config = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()}
        for key, kinds in (("bos_token", (str, type(None))), ("eos_token", (str, type(None))),
                           ("pad_token", (str, type(None))), ("add_bos_token", (bool,)), ("add_eos_token", (bool,))):
            if key in config and not isinstance(config[key], kinds):
                raise ModelError(f"{cfg_file}: key {key!r} is {config[key]!r}, expected "
                                 f"{'true or false' if bool in kinds else 'a token string or null'}")
        return cls(tok, config, where=str(file))

    def _token_id(self, token):
        return None if token is None else self.tok.token_to_id(token)

    def _set_template(self, bos: bool, eos: bool):
        # what LlamaTokenizerFast.update_post_processor does with add_bos_token / add_eos_token
        from tokenizers.processors import TemplateProcessing
        pieces, special = ["$A"], []
        if bos and self.bos_id is not None:
            pieces.insert(0, self.tok.id_to_token(self.bos_id))
            special.append((pieces[0], self.bos_id))
        if eos and self.eos_id is not None:
            pieces.append(self.tok.id_to_token(self.eos_id))
            special.append((pieces[-1], self.eos_id))
        try:
            self.tok.post_processor = TemplateProcessing(single=pieces, special_tokens=special)
        except Exception as e:  # the Rust library raises a bare Exception on a bad template
            raise ModelError(f"{self.where}: BOS/EOS {pieces} do not make a template: {e}") from None

    def encode(self, texts, add_special_tokens=True, max_length=None) -> list[list[int]]:
        encs = self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids[:max_length] if max_length else e.ids for e in encs]

    def encode_with_prompt(self, texts, prompt=None, max_length=None):
        """-> list of (ids, text_mask): text_mask marks the tokens of the text itself (inside the
        prompt). The text is cut, never the prompt, so that the whole prompt fits max_length."""
        if prompt is None:
            ids = self.encode(texts, True, max_length)
            return [(x, [True] * len(x)) for x in ids]
        if "{text}" not in prompt:
            raise ModelError(f"prompt {prompt!r} has no {{text}} placeholder")
        out = []
        for text in texts:
            ids, mask = self._prompted(prompt, text)
            if max_length and len(ids) > max_length:
                # cut after the keep-th text token as tokenized inside the prompt (alone, the text can
                # tokenize differently); merges across the cut can add a token: shorten until it fits
                start = prompt.index("{text}")
                offsets = self.tok.encode(prompt.replace("{text}", text)).offsets
                ends = [e - start for (_, e), m in zip(offsets, mask) if m]  # [text tokens]
                keep = sum(mask) - (len(ids) - max_length)  # text tokens that fit
                while len(ids) > max_length:
                    if keep <= 0:
                        raise ModelError(f"prompt {prompt!r} alone needs more than max_length={max_length} tokens "
                                         f"with {self.where}")
                    ids, mask = self._prompted(prompt, text[: ends[keep - 1]])
                    keep -= 1
            out.append((ids, mask))
        return out

    def _prompted(self, prompt, text):
        start = prompt.index("{text}")
        full = prompt.replace("{text}", text)
        enc = self.tok.encode(full)
        end = start + len(text)
        mask = [bool(s < end and e > start) and i not in self.special_ids
                for i, (s, e) in zip(enc.ids, enc.offsets)]
        return enc.ids, mask

    def batch(self, texts, max_length=None, add_special_tokens=True):
        """-> input_ids [B, T] long, attention_mask [B, T] bool, right-padded."""
        return pad_batch(self.encode(texts, add_special_tokens, max_length), self.pad_id)

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


def pad_batch(seqs, pad_id, masks=None):
    """Right-pad lists of ids -> input_ids [B, T] long, attention_mask [B, T] bool
    (and, given per-token masks, those padded with False)."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.bool)
    sub = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, : len(s)] = True
        if masks is not None:
            sub[i, : len(s)] = torch.tensor(masks[i], dtype=torch.bool)
    return (ids, att) if masks is None else (ids, att, sub)

