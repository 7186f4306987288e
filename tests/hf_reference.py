"""Reference checkpoints and forward passes from Hugging Face transformers (test/bench helper).

make_tiny_checkpoint writes a random checkpoint of one supported family (FAMILIES) to a folder
through transformers' own config class, modeling code and save_pretrained (single file or
sharded), with the bundled stories260K tokenizer beside it; save_random_checkpoint does the same
for any config.json dict (shrink_config makes a real one tiny). hf_hidden_states runs
transformers' forward pass, causal (its own mask from the 2-D padding mask) or bidirectional (an
explicit 4-D additive mask that hides padded keys only; for Gemma 3, whose sliding layers need
masks of their own, transformers' use_bidirectional_attention); parity_errors compares model.py
with it. GEMMA3 holds tiny Gemma 3 configs (tests/test_gemma3.py).
transformers is imported inside the functions, so importing this module needs only torch.

Dimensions: B batch, T tokens, D hidden, V vocabulary.

Not included: tokenizers other than stories260K's (vocab 512), generation, KV caches.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "data" / "models" / "stories260K"
VOCAB = 512  # the stories260K tokenizer's vocabulary, so every tiny checkpoint can use it

# Tiny configs of every supported family, as HF config.json keys (transformers v4 style).
# Widths are small but keep each family's structure: GQA, biases, explicit head_dim, ties.
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
FAMILIES = {
    "llama": dict(_BASE, model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0),
    # original_max_position_embeddings 16 puts llama3 rope scaling to work at a dozen tokens:
    # wavelengths above 16 are slowed by `factor`, those between 4 and 16 are interpolated
    "llama3_rope": dict(_BASE, model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama_linear_rope": dict(_BASE, model_type="llama", rope_scaling=dict(type="linear", factor=4.0)),
    "llama_tied_bias": dict(_BASE, model_type="llama", tie_word_embeddings=True, num_key_value_heads=4,
                            attention_bias=True, mlp_bias=True),
    "mistral": dict(_BASE, model_type="mistral", rope_theta=1e6, sliding_window=None, num_key_value_heads=1),
    "qwen2": dict(_BASE, model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, sliding_window=4096,
                  use_sliding_window=False),
    # head_dim 32 with hidden 64 / 4 heads (not 16): q_proj is wider than the hidden size
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, sliding_window=None, use_sliding_window=False),
}


# Gemma 3 (gemma3_text): one KV head, head_dim 32 (not hidden/heads), query_pre_attn_scalar 24 (not
# head_dim), a sliding window of 8 tokens on layers 0 and 2 (inputs of 16-20 tokens cross it)
_GEMMA3_BASE = dict({k: v for k, v in _BASE.items() if k != "hidden_act"}, model_type="gemma3_text",
                    num_hidden_layers=3, num_key_value_heads=1, head_dim=32, hidden_activation="gelu_pytorch_tanh",
                    rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=100.0, query_pre_attn_scalar=24,
                    sliding_window=8, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])
GEMMA3 = {
    "gemma3": _GEMMA3_BASE,
    # an odd window (its bidirectional half-width rounds), GQA with 2 kv heads, biases, an untied head,
    # linear rope scaling on the global layers only, the layer pattern from sliding_window_pattern
    "gemma3_variant": dict({k: v for k, v in _GEMMA3_BASE.items() if k != "layer_types"}, sliding_window=7,
                           num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
                           rope_scaling=dict(rope_type="linear", factor=4.0), num_hidden_layers=4,
                           sliding_window_pattern=2),
}


def tiny_config(family: str, **overrides) -> dict:
    """A FAMILIES (or GEMMA3) entry (config.json keys) with `overrides` applied."""
    return dict((FAMILIES | GEMMA3)[family], **overrides)


def shrink_config(cfg: dict, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 96) -> dict:
    """A real config.json made tiny with the same structure: its rope settings, tie flag, biases,
    norm eps, the GQA ratio (as close as `heads` allows) and, when it states head_dim, the same
    head_dim / (hidden / heads) ratio (rounded to an even width), so an explicit head_dim that
    differs from hidden/heads still differs. The vocabulary (and BOS/EOS ids) become
    stories260K's."""
    if "text_config" in cfg:  # Gemma 3 multimodal: the text decoder shrinks, the vision tower becomes tiny
        vision = dict(cfg["vision_config"], hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        return dict(cfg, text_config=shrink_config(cfg["text_config"], layers, hidden, heads, ffn),
                    vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                    boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    if cfg.get("model_type") in ("gemma3", "gemma3_text"):  # Gemma3TextConfig's defaults fill the gaps
        cfg = {"num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 26} | cfg
        if "layer_types" in cfg:
            cfg["layer_types"] = cfg["layer_types"][:layers]
    kv = max(1, heads * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"])
    small = dict(cfg, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 num_key_value_heads=kv, intermediate_size=ffn, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if cfg.get("head_dim"):
        ratio = cfg["head_dim"] * cfg["num_attention_heads"] / cfg["hidden_size"]
        small["head_dim"] = 2 * round(ratio * hidden / heads / 2)
    return small


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight with O(1) activations: HF's init (std 0.02) gives near-uniform
    attention, under which RoPE or masking mistakes hide below any tolerance. Norm weights are
    random too, so that a norm applied in the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * noise)
        elif p.ndim == 1:  # biases
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:  # [out, in]: unit-scale outputs; q/k a little larger for peaked attention
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.copy_(gain * noise / p.shape[1] ** 0.5)


def save_random_checkpoint(path, config: dict, max_shard_size=None, seed: int = 0, v5_config=False) -> Path:
    """Build transformers' model for a config.json dict, randomise it, save it to `path` with
    save_pretrained (sharded when max_shard_size is given, e.g. "30KB"), and add the stories260K
    tokenizer files. config.json is `config` as given (v4 style, as real checkpoints publish
    it), or with v5_config the one transformers itself writes (rope_parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    randomize_(model, seed)
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    if not v5_config:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, path / name)
    return path


def make_tiny_checkpoint(path, family: str = "llama", max_shard_size=None, seed: int = 0, v5_config=False,
                         **overrides) -> Path:
    """A random checkpoint of one FAMILIES entry in `path`; overrides change config.json keys."""
    return save_random_checkpoint(path, tiny_config(family, **overrides), max_shard_size, seed, v5_config)


def load_hf(path, attn_implementation: str = "eager"):
    """transformers' own model for a checkpoint folder, fp32, eval mode (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=attn_implementation).eval()


def gemma3_decoder(model):
    """transformers' Gemma 3 text decoder: Gemma3TextModel (in Gemma3ForCausalLM or, for the
    multimodal models, Gemma3ForConditionalGeneration), or None for other families."""
    if model.config.model_type not in ("gemma3", "gemma3_text"):
        return None
    return getattr(model.model, "language_model", model.model)


def bidirectional_twin(decoder):
    """The same Gemma3TextModel weights under a config with use_bidirectional_attention=True, built
    through the config class (whose __post_init__ turns the window into the symmetric one)."""
    cfg = type(decoder.config).from_dict(decoder.config.to_dict() | {"use_bidirectional_attention": True})
    cfg._attn_implementation = decoder.config._attn_implementation  # eager stays eager
    twin = type(decoder)(cfg)
    twin.load_state_dict(decoder.state_dict())
    return twin.to(decoder.dtype).eval()


def padding_mask_4d(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[B, T] (1 = real) -> additive [B, 1, T, T]: 0 where the key is real, the dtype's minimum
    where it is padding; no causal part, so every query sees every real key."""
    B, T = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
    return torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~keys, torch.finfo(dtype).min)


@torch.no_grad()
def hf_hidden_states(model_or_path, input_ids, attention_mask, causal: bool) -> torch.Tensor:
    """transformers' last hidden states [B, T, D] (after the final norm). Causal: its own causal
    mask from the 2-D padding mask. Bidirectional: a custom 4-D mask, which transformers passes
    to attention as it is (masking_utils: an already prepared 4-D mask is returned as-is)."""
    model = load_hf(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    decoder = gemma3_decoder(model)
    if decoder is not None:
        decoder = decoder if causal else bidirectional_twin(decoder)
        return decoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
    if causal:
        mask = attention_mask.long()
    else:
        mask = padding_mask_4d(attention_mask, model.dtype)
    return model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


@torch.no_grad()
def hf_token_logits(model, h: torch.Tensor) -> torch.Tensor:
    """h [..., D] -> transformers' lm_head logits [..., V]."""
    return model.lm_head(h)


def random_batch(lengths, vocab: int = VOCAB, seed: int = 0, bos_id: int = 1):
    """Right-padded random token ids [B, T] starting with BOS, and the mask [B, T] (1 = real);
    padding slots hold random ids too, so a leak of padding into real positions shows."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    ids[:, 0] = bos_id
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def parity_errors(path, lengths=(16, 9, 3, 16), seed: int = 0) -> dict:
    """Max abs differences between model.py and transformers on one checkpoint folder, fp32, on a
    right-padded random batch, real positions only: hidden states causal and bidirectional, and
    the LM-head logits of those hidden states."""
    if str(ROOT) not in sys.path:  # model.py, the code under test, lives at the repo root
        sys.path.insert(0, str(ROOT))
    import model

    ours, _ = model.load(path)
    hf = load_hf(path)
    ids, mask = random_batch(lengths, seed=seed)
    real = mask.bool()
    errors = {}
    with torch.no_grad():
        for causal in (True, False):
            kind = "causal" if causal else "bidirectional"
            ref = hf_hidden_states(hf, ids, mask, causal)[real]  # [N, D]
            h = ours(ids, mask.bool(), causal=causal)[real]
            errors[kind] = (h - ref).abs().max().item()
            errors[kind + "_logits"] = (ours.token_logits(h) - hf_token_logits(hf, ref)).abs().max().item()
    return errors
