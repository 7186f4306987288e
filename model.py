"""The decoder LLM, its tokenizer, LoRA, pooling and the embedder, written from scratch.

Follows Hugging Face's modeling_llama.py / modeling_mistral.py / modeling_qwen2.py /
modeling_qwen3.py (the forward pass is tested against them) and the "Model" section of
the method (README.md, "The method"; Text2Token, arXiv 2510.10224): the embedding of a text is the last layer's hidden
states after the final RMSNorm, mean-pooled (or the last token), with causal or bidirectional
attention; lm_head(h) is its view in token space.

Dimensions: B batch, T tokens, D hidden, H query heads, K key/value heads, hd head dim,
F feed-forward width, V vocabulary, r LoRA rank.

Not included: KV cache and generation, sliding-window attention beyond the window, rope
scaling other than "default", "linear" and "llama3", tensor parallelism, quantisation.
"""

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROMPT_EOL = 'This sentence : "{text}" means in one word:"'  # PromptEOL (Jiang et al. 2023)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelError(ValueError):
    """A user-facing problem with a checkpoint, a run directory or a setting."""


# -----------------------------------------------------------------------------
# config.json -> ModelArgs


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008  # intermediate_size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_pos: int = 8192  # llama3 only
    qkv_bias: bool = False  # Qwen2 always; Llama when attention_bias
    o_bias: bool = False  # Llama's attention_bias also covers o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096


def _rope_settings(cfg, where):
    """Read RoPE from either config style: top-level rope_theta/rope_scaling (transformers v4)
    or rope_parameters (transformers v5)."""
    if cfg.get("rope_parameters") is not None:
        params = dict(cfg["rope_parameters"])
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        params = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    out = dict(rope_theta=float(theta), rope_type=kind)
    if kind == "default":
        return out
    if kind == "linear":
        return out | dict(rope_factor=float(params["factor"]))
    if kind == "llama3":
        return out | dict(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_pos=int(params["original_max_position_embeddings"]),
        )
    raise ModelError(f"{where}: rope type {kind!r} (key rope_scaling/rope_parameters) is not "
                     f"supported; supported: default, linear, llama3")


def args_from_config(cfg: dict, where="config.json") -> ModelArgs:
    """Map each HF config key we implement onto ModelArgs; refuse what we do not implement."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise ModelError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in cfg:
            raise ModelError(f"{where}: missing key {key!r}")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    # Qwen2 reads use_sliding_window; Mistral has only sliding_window (null in v0.2+).
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        # modeling_qwen2: q/k/v always biased; modeling_mistral: never; llama/qwen3: attention_bias
        qkv_bias=True if mt == "qwen2" else False if mt == "mistral" else bias,
        o_bias=bias if mt in ("llama", "qwen3") else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        sliding_window=window,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        **_rope_settings(cfg, where),
    )


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


# -----------------------------------------------------------------------------
# The transformer


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device: torch's normal_ has no native
    meta kernel, and its Python one imports sympy on first use (~1.3 s and ~80 MB per process,
    BENCHMARKS.md). A model built on meta gets its weights assigned by load_weights anyway."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as LlamaRMSNorm does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [hd/2] in fp32, with the checkpoint's rope scaling applied."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    if args.rope_type == "linear":
        inv = inv / args.rope_factor
    elif args.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, smooth in between
        low_wl = args.rope_original_max_pos / args.rope_low_freq_factor
        high_wl = args.rope_original_max_pos / args.rope_high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (args.rope_original_max_pos / wl - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor)
        mid = (1 - smooth) * inv / args.rope_factor + smooth * inv
        inv = torch.where(wl > low_wl, inv / args.rope_factor, inv)
        inv = torch.where((wl >= high_wl) & (wl <= low_wl), mid, inv)
    return inv


def rope_cos_sin(args: ModelArgs, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = rope_inv_freq(args).to(device)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)  # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, hd], HF's rotate-half layout
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    # x [B, H, T, hd]; cos/sin [T, hd] cast to x's dtype as in HF's apply_rotary_pos_emb
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each kv head
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean SDPA mask: True where query t may attend to key s. Padded keys are always hidden.

    Bidirectional: [B, 1, 1, T], broadcast over the queries (SDPA then reads B*T mask entries
    rather than B*T*T: attention ran ~20% faster on CPU, BENCHMARKS.md). A row with no real token
    at all (an empty text) sees its own padding instead, since a fully masked row gives NaN;
    nothing pools it. Causal: [B, 1, T, T]; each position may also see itself, so a padded query
    row is never fully masked; real rows are unaffected since they see themselves anyway."""
    B, T = attention_mask.shape
    real = attention_mask.bool()  # [B, T]
    if not causal:
        return (real | ~real.any(-1, keepdim=True))[:, None, None, :]  # [B, 1, 1, T]
    past = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()  # [T, T]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (real[:, None, None, :] & past) | eye  # [B, 1, T, T]


class Transformer(nn.Module):
    """A decoder stack; parameter names are the HF checkpoint's without the 'model.' prefix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False

    def forward(self, input_ids, attention_mask=None, causal=False):
        """input_ids [B, T] long, attention_mask [B, T] (1 = real token) -> hidden [B, T, D]
        after the final norm."""
        B, T = input_ids.shape
        if self.args.sliding_window is not None and T > self.args.sliding_window:
            raise ModelError(f"sequence of {T} tokens exceeds the sliding window "
                             f"({self.args.sliding_window}), which is not implemented")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask_4d(attention_mask, causal)  # [B, 1, 1 or T, T]
        cos, sin = rope_cos_sin(self.args, T, input_ids.device)  # [T, hd] each, positions 0..T-1
        x = self.embed_tokens(input_ids)  # [B, T, D]
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def token_logits(self, h):
        """h [B, D] -> logits [B, V] over the vocabulary, in fp32 (the paper's token-space view z(x) = lm_head(h))."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.lm_head.weight.float())


# -----------------------------------------------------------------------------
# Loading checkpoints (HF folders and run directories)


def is_run_dir(path) -> bool:
    """A run directory of t2t.py train (it has meta.json) rather than an HF checkpoint."""
    return (Path(path) / "meta.json").is_file()


def weight_files(path) -> list[Path]:
    """The safetensors files that hold a checkpoint's (or a run's own) weights, sorted."""
    path = Path(path)
    if is_run_dir(path):
        return sorted(p for p in (path / "adapter.safetensors", path / "model.safetensors") if p.is_file())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: missing or empty key 'weight_map'")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelError(f"{index}: names shard {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return files


def weights_sha256(path, n=12) -> str:
    h = hashlib.sha256()
    for f in weight_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:n]


def hf_to_ours(key: str) -> str:
    """The one name mapping: HF keys are ours under a 'model.' prefix (lm_head has none)."""
    return key.removeprefix("model.")


def ours_to_hf(key: str) -> str:
    return key if key == "lm_head.weight" else "model." + key


def load_weights(model: Transformer, files, device, dtype):
    """Strict copy of the checkpoint tensors into a model built on the meta device."""
    expected = dict(model.state_dict())
    if model.args.tie_embeddings:
        expected.pop("lm_head.weight", None)
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                ours = hf_to_ours(key)
                if ours == "lm_head.weight" and model.args.tie_embeddings:
                    continue  # a tied head saved anyway: it is the embedding
                if ours not in expected:
                    raise ModelError(f"{f}: unexpected tensor {key!r} (not in a {model.args.model_type} model "
                                     f"with this config)")
                t = fh.get_tensor(key)
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise ModelError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, the config implies "
                                     f"{tuple(expected[ours].shape)}")
                state[ours] = t.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelError(f"{files[0].parent}: missing tensor(s) {', '.join(ours_to_hf(k) for k in missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=not model.args.tie_embeddings, assign=True)
    if model.args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def load_checkpoint(path, device="cpu", dtype=torch.float32) -> Transformer:
    """An HF checkpoint folder -> Transformer in `dtype` on `device`, one copy of the weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory")
    args = args_from_config(read_json(path / "config.json"), where=str(path / "config.json"))
    files = weight_files(path)
    with torch.device("meta"):
        model = Transformer(args)
    load_weights(model, files, device, dtype)
    return model.eval()


def load(path, device="cpu", dtype=torch.float32):
    """Any HF checkpoint folder of a supported family, or a run directory -> (Transformer, Tokenizer).

    A run directory is rebuilt from its base: stage 2 loads its stage-1 run (which merges its own
    adapter), then applies and merges the stage-2 adapter; full fine-tuning loads model.safetensors."""
    path = Path(path)
    if not is_run_dir(path):
        return load_checkpoint(path, device, dtype), Tokenizer.from_dir(path)
    meta = read_json(path / "meta.json")
    base = meta.get("init") or meta.get("base_model")
    if not base:
        raise ModelError(f"{path / 'meta.json'}: missing key 'base_model'")
    model, tok = load(base, device, dtype)
    lora = meta.get("lora")
    if lora:
        add_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=0.0, targets=lora["targets"])
        load_lora(model, path / "adapter.safetensors")
        merge_lora(model)
    else:
        load_weights(model, [path / "model.safetensors"], device, dtype)
    return model.eval(), tok


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """tokenizer.json through the `tokenizers` library. BOS/EOS come from the checkpoint's own
    post-processor (Llama/Mistral prepend BOS, Qwen adds nothing), adjusted by
    tokenizer_config.json's add_bos_token / add_eos_token when it states them."""

    def __init__(self, tok: HFTokenizer, config: dict, where: str = "tokenizer"):
        self.tok = tok
        self.where = where  # the tokenizer.json, named in errors
        self.tok.no_truncation()
        self.tok.no_padding()
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
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelError(f"{file}: file not found (a checkpoint folder needs tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception on bad files
            raise ModelError(f"{file}: cannot be read by the tokenizers library: {e}") from None
        cfg_file = path / "tokenizer_config.json"
        config = read_json(cfg_file) if cfg_file.is_file() else {}
        config = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()}
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
        self.tok.post_processor = TemplateProcessing(single=" ".join(pieces), special_tokens=special)

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


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) B A dropout(x), B starts at zero


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update; weight/bias keep their names, so the base checkpoint
    keys are unchanged and lora_A / lora_B are the only new ones."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_on:
            return y
        # alpha/r scales the rank-r activations [.., r], not the [.., out] update: same sum, one
        # elementwise pass over r instead of out columns (forward and backward)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scaling, self.lora_B)


def _lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model: nn.Module, r=16, alpha=32, dropout=0.05, targets=DEFAULT_LORA_TARGETS):
    """Wrap every Linear named in `targets` (HF module names) with a fresh adapter (fp32 weights);
    freeze everything else. Returns the list of trainable parameters."""
    targets, found = set(targets), set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                found.add(child_name)
                lora = LoRALinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lora.weight, lora.bias = child.weight, child.bias
                dev = child.weight.device
                lora.lora_A = nn.Parameter(torch.empty(r, child.in_features, device=dev))  # [r, in]
                lora.lora_B = nn.Parameter(torch.zeros(child.out_features, r, device=dev))  # [out, r]
                nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft
                lora.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
                lora.scaling, lora.lora_on, lora.r, lora.alpha = alpha / r, True, r, alpha
                setattr(module, child_name, lora)
    if missing := targets - found:
        raise ModelError(f"LoRA target(s) {', '.join(sorted(missing))} match no linear layer; "
                         f"the layers are {', '.join(DEFAULT_LORA_TARGETS)}")
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    return [p for n, p in model.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def lora_enabled(model, on: bool):
    """Switch every adapter on or off inside the block (the stage-2 teacher is the student with
    its adapter off: same weights, no second copy)."""
    modules = [m for _, m in _lora_modules(model)]
    before = [m.lora_on for m in modules]
    for m in modules:
        m.lora_on = on
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            m.lora_on = b


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its base weight and turn the layer back into a plain nn.Linear."""
    for name, m in _lora_modules(model):
        delta = (m.lora_B.float() @ m.lora_A.float()) * m.scaling  # [out, in]
        m.weight.data += delta.to(m.weight.dtype)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, plain)
    return model


def lora_state_dict(model) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora(model, path):
    """Load an adapter saved by save_file(lora_state_dict(model)); every key must match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    expected = lora_state_dict(model)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        if keys != set(expected):
            extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
            raise ModelError(f"{path}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
        for k in sorted(keys):
            t = fh.get_tensor(k)
            if t.shape != expected[k].shape:
                raise ModelError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
            expected[k].copy_(t)


def save_lora(model, path):
    save_file(lora_state_dict(model), str(path))


# -----------------------------------------------------------------------------
# Pooling and the embedder


def mean_pool(h, mask):
    """h [B, T, D], mask [B, T] bool -> [B, D]: the average over the masked tokens, in fp32."""
    m = mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    return (h.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def last_pool(h, mask):
    """h [B, T, D], mask [B, T] bool (right padding) -> [B, D]: the last real token, in fp32."""
    last = mask.long().sum(1).clamp(min=1) - 1  # [B]
    return h[torch.arange(h.shape[0], device=h.device), last].float()


class Embedder:
    """Text -> embedding h(x): the model's final-norm hidden states, pooled.

    pooling 'mean' averages the text's own tokens (BOS included, a prompt's tokens excluded);
    'last' takes the last token, by default with the PromptEOL template."""

    def __init__(self, model, tokenizer, pooling="mean", causal=False, max_length=512, prompt=None):
        if pooling not in ("mean", "last"):
            raise ModelError(f"pooling {pooling!r} is not supported (mean or last)")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.causal, self.max_length = pooling, causal, max_length
        self.prompt = PROMPT_EOL if (prompt is None and pooling == "last") else prompt
        self.dim = model.args.dim

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def settings(self) -> dict:
        return dict(attention="causal" if self.causal else "bidirectional", pooling=self.pooling,
                    prompt=self.prompt, max_length=self.max_length)

    @classmethod
    def from_pretrained(cls, path, pooling=None, attention=None, max_length=None, prompt=None,
                        device="cpu", dtype=torch.float32):
        """An HF checkpoint folder; settings not given come from its text2token.json (written by
        `t2t.py export`) or default to mean pooling, bidirectional attention, 512 tokens."""
        if is_run_dir(path):
            return cls.from_run(path, device, dtype, pooling=pooling, attention=attention,
                                max_length=max_length, prompt=prompt)
        saved = read_json(Path(path) / SETTINGS_FILE) if (Path(path) / SETTINGS_FILE).is_file() else {}
        model, tok = load(path, device, dtype)
        return cls(model, tok, pooling or saved.get("pooling", "mean"),
                   attention_is_causal(attention or saved.get("attention", "bidirectional")),
                   max_length or saved.get("max_length", 512), prompt if prompt is not None else saved.get("prompt"))

    @classmethod
    def from_run(cls, run_dir, device="cpu", dtype=torch.float32, **overrides):
        """A run directory's model with the attention, pooling and prompt it was trained with."""
        meta = read_json(Path(run_dir) / "meta.json")
        emb = dict(meta.get("embedding", {}))
        emb.update({k: v for k, v in overrides.items() if v is not None})
        model, tok = load(run_dir, device, dtype)
        return cls(model, tok, emb.get("pooling", "mean"), attention_is_causal(emb.get("attention", "bidirectional")),
                   emb.get("max_length", 512), emb.get("prompt"))

    def tokenize(self, texts, max_length=None):
        """-> input_ids [B, T], attention_mask [B, T], pool_mask [B, T] (right padding)."""
        enc = self.tokenizer.encode_with_prompt(texts, self.prompt, max_length or self.max_length)
        return pad_batch([e[0] for e in enc], self.tokenizer.pad_id, [e[1] for e in enc])

    def pool(self, h, attention_mask, pool_mask):
        if self.pooling == "last":
            return last_pool(h, attention_mask)
        return mean_pool(h, pool_mask)

    def embed_ids(self, input_ids, attention_mask, pool_mask):
        """Token tensors -> pooled h [B, D] fp32, differentiable (used by training)."""
        dev = self.device
        h = self.model(input_ids.to(dev), attention_mask.to(dev), causal=self.causal)  # [B, T, D]
        return self.pool(h, attention_mask.to(dev), pool_mask.to(dev))

    def embed(self, texts, max_length=None):
        """list of texts -> pooled h [B, D] fp32 torch tensor (respects torch.no_grad)."""
        return self.embed_ids(*self.tokenize(texts, max_length))

    @torch.no_grad()
    def encode(self, texts, batch_size=32, progress=None, **_):
        """list of texts -> float32 numpy [n, D]. Texts are sorted by length so that batches waste
        little padding, then put back in order; results do not depend on batch composition."""
        texts = list(texts)
        enc = self.tokenizer.encode_with_prompt(texts, self.prompt, self.max_length)
        order = sorted(range(len(texts)), key=lambda i: -len(enc[i][0]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, att, sub = pad_batch([enc[i][0] for i in idx], self.tokenizer.pad_id, [enc[i][1] for i in idx])
            out[idx] = self.embed_ids(ids, att, sub).cpu().numpy()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
        self.model.train(was_training)
        return out


def attention_is_causal(attention: str) -> bool:
    if attention not in ("causal", "bidirectional"):
        raise ModelError(f"attention {attention!r} is not supported (causal or bidirectional)")
    return attention == "causal"


def args_dict(args: ModelArgs) -> dict:
    return asdict(args)


# -----------------------------------------------------------------------------
# Saving in the HF layout (t2t.py export)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SETTINGS_FILE = "text2token.json"  # our embedding settings beside an exported checkpoint


def save_hf(model: Transformer, base_dir, out_dir, settings: dict, dtype=None, max_shard_bytes=5 * 2**30):
    """Write `model` as an HF checkpoint folder: the base's config.json (dtype updated), weights
    under HF names (sharded with an index above max_shard_bytes), the base's tokenizer files, and
    the embedding settings in text2token.json. Every file goes through a temporary name."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {ours_to_hf(k): v for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        write_atomic(out_dir / name, lambda tmp: save_file({k: state[k] for k in keys}, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        write_atomic(out_dir / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    config = read_json(base_dir / "config.json")
    first = next(iter(state.values()))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    write_atomic(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            write_atomic(out_dir / name, lambda tmp: tmp.write_bytes((base_dir / name).read_bytes()))
    write_atomic(out_dir / SETTINGS_FILE, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))
    return out_dir


def write_atomic(path, write):
    """Call write(tmp) on a temporary name beside `path`, then rename: a kill mid-write never
    leaves a file at `path` that looks complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def base_checkpoint_dir(path) -> Path:
    """The HF folder a model (or run directory) ultimately comes from (for its config/tokenizer)."""
    path = Path(path)
    while is_run_dir(path):
        meta = read_json(path / "meta.json")
        path = Path(meta.get("init") or meta["base_model"])
    return path
