"""How a Hugging Face checkpoint maps onto the network of model.py: config.json -> ModelArgs (one
function that maps each key we implement and refuses the rest), ModelArgs -> config.json (export,
GGUF), the tensor names (HF's onto our module names), and the checks every loaded tensor passes.

Follows transformers' configuration_llama.py / _mistral / _qwen2 / _qwen3 / _gemma3 (each key's
meaning and default) and the checkpoints' own layout (model.* keys; Gemma 3's multimodal
language_model.* keys beside a vision tower).

Not included: the files themselves (checkpoints.py, gguf_file.py), the network (model.py).
"""

import math
from dataclasses import asdict, dataclass

import torch

from files import ModelError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


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
    # Gemma 3 (modeling_gemma3.py); the defaults are Llama's
    embed_scale: bool = False  # embeddings times sqrt(D)
    norm_offset: bool = False  # RMSNorm scales by (1 + w) in fp32 (weights centred on 0)
    sandwich_norm: bool = False  # norms after attention and after the MLP too: 4 per block
    act: str = "silu"  # the MLP gate: silu | gelu_tanh (GeGLU)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: 1/sqrt(hd)
    layer_types: list | None = None  # per layer "sliding_attention" | "full_attention"; None: all full
    rope_local_theta: float = 10000.0  # the RoPE base of sliding layers


def _number(cfg, key, where, default=None, kind=int, minimum=1, prefix=""):
    """cfg[key] (null or absent: `default`) as an int >= minimum, or as a finite float > 0 for
    kind=float. JSON true/false, strings and 4096.0 for an int are refused, never converted."""
    value = cfg.get(key)
    value = default if value is None else value
    if kind is int and (type(value) is not int or value < minimum):
        raise ModelError(f"{where}: key {prefix + key!r} must be an integer >= {minimum}, got {value!r}")
    if kind is float and (type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
        raise ModelError(f"{where}: key {prefix + key!r} must be a positive number, got {value!r}")
    return kind(value)


def _flag(cfg, key, where, default=False):
    """cfg[key] (null or absent: `default`) as a JSON true/false."""
    value = cfg.get(key)
    value = default if value is None else value
    if type(value) is not bool:
        raise ModelError(f"{where}: key {key!r} must be true or false, got {value!r}")
    return value


def _rope_settings(cfg, where):
    """Read RoPE from either config style: top-level rope_theta/rope_scaling (transformers v4)
    or rope_parameters (transformers v5)."""
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ModelError(f"{where}: key {key!r} must be an object, got {params!r}")
    theta_from, prefix = (params, key + ".") if "rope_theta" in params else (cfg, "")
    theta = _number(theta_from, "rope_theta", where, 10000.0, float, prefix=prefix)
    kind = params.get("rope_type", params.get("type", "default"))
    out = dict(rope_theta=theta, rope_type=kind)
    if kind == "default":
        return out
    if kind == "linear":
        return out | dict(rope_factor=_number(params, "factor", where, kind=float, prefix=key + "."))
    if kind == "llama3":
        low = _number(params, "low_freq_factor", where, kind=float, prefix=key + ".")
        high = _number(params, "high_freq_factor", where, kind=float, prefix=key + ".")
        if not high > low:  # the smoothing between the two divides by high - low
            raise ModelError(f"{where}: key {key}.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
        return out | dict(
            rope_factor=_number(params, "factor", where, kind=float, prefix=key + "."),
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            rope_original_max_pos=_number(params, "original_max_position_embeddings", where, prefix=key + "."),
        )
    raise ModelError(f"{where}: rope type {kind!r} (key rope_scaling/rope_parameters) is not "
                     f"supported; supported: default, linear, llama3")


def args_from_config(cfg: dict, where="config.json") -> ModelArgs:
    """Map each HF config key we implement onto ModelArgs; refuse what we do not implement, and
    any value of the wrong type or range, naming the key."""
    mt = cfg.get("model_type")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2 (tanh caps on the logits)
        if cfg.get(key) is not None:
            raise ModelError(f"{where}: key {key!r} is {cfg[key]!r}: logit soft-capping is not implemented")
    if mt not in SUPPORTED_TYPES:
        raise ModelError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    if mt in ("gemma3", "gemma3_text"):
        return gemma3_args(cfg, where)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if cfg.get(key) is None:
            raise ModelError(f"{where}: missing key {key!r}")
    dim = _number(cfg, "hidden_size", where)
    n_heads = _number(cfg, "num_attention_heads", where)
    n_kv_heads = _number(cfg, "num_key_value_heads", where, n_heads)
    if n_heads % n_kv_heads:  # grouped-query attention shares each kv head among n_heads / n_kv_heads
        raise ModelError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
    head_dim = _number(cfg, "head_dim", where, dim // n_heads)
    if head_dim % 2:
        raise ModelError(f"{where}: head_dim {head_dim} is odd; rotate-half RoPE needs an even head dim")
    # Qwen2 reads use_sliding_window; Mistral has only sliding_window (null in v0.2+).
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not _flag(cfg, "use_sliding_window", where):
        window = None
    if window is not None:
        window = _number(cfg, "sliding_window", where)
    bias = _flag(cfg, "attention_bias", where)
    return ModelArgs(
        model_type=mt,
        vocab_size=_number(cfg, "vocab_size", where),
        dim=dim,
        n_layers=_number(cfg, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_number(cfg, "intermediate_size", where),
        norm_eps=_number(cfg, "rms_norm_eps", where, 1e-6, float),
        # modeling_qwen2: q/k/v always biased; modeling_mistral: never; llama/qwen3: attention_bias
        qkv_bias=True if mt == "qwen2" else False if mt == "mistral" else bias,
        o_bias=bias if mt in ("llama", "qwen3") else False,
        mlp_bias=_flag(cfg, "mlp_bias", where),
        qk_norm=mt == "qwen3",
        sliding_window=window,
        tie_embeddings=_flag(cfg, "tie_word_embeddings", where),
        max_position_embeddings=_number(cfg, "max_position_embeddings", where, 4096),
        **_rope_settings(cfg, where),
    )


# transformers' Gemma3TextConfig defaults: a config states only what differs (gemma-3-4b-it's
# text_config gives 5 keys), so these are part of the format
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6)
LAYER_TYPES = ("sliding_attention", "full_attention")


def gemma3_args(cfg: dict, where) -> ModelArgs:
    """A gemma3_text config, or a gemma3 (multimodal) one whose text_config describes the text
    decoder, over GEMMA3_TEXT_DEFAULTS -> ModelArgs (Gemma3TextConfig's meaning of each key)."""
    if cfg.get("model_type") == "gemma3":
        text = cfg.get("text_config") or {}
        if not isinstance(text, dict):
            raise ModelError(f"{where}: key 'text_config' must be an object, got {text!r}")
        where = f"{where} (text_config)"
        cfg = text
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelError(f"{where}: key {key!r} is {cfg[key]!r}: logit soft-capping is not implemented")
    cfg = GEMMA3_TEXT_DEFAULTS | {k: v for k, v in cfg.items() if v is not None}
    if cfg["hidden_activation"] != "gelu_pytorch_tanh":
        raise ModelError(f"{where}: hidden_activation {cfg['hidden_activation']!r} is not supported "
                         f"(only gelu_pytorch_tanh)")
    _flag(cfg, "use_bidirectional_attention", where)  # EmbeddingGemma's default; ours is chosen per call
    n_heads = _number(cfg, "num_attention_heads", where)
    n_kv_heads = _number(cfg, "num_key_value_heads", where)
    if n_heads % n_kv_heads:
        raise ModelError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
    head_dim = _number(cfg, "head_dim", where)
    if head_dim % 2:
        raise ModelError(f"{where}: head_dim {head_dim} is odd; rotate-half RoPE needs an even head dim")
    n_layers = _number(cfg, "num_hidden_layers", where)
    layer_types = cfg.get("layer_types")
    if layer_types is None:  # Gemma3TextConfig: every sliding_window_pattern-th layer is global
        every = _number(cfg, "sliding_window_pattern", where)
        layer_types = [LAYER_TYPES[(i + 1) % every == 0] for i in range(n_layers)]
    if not (isinstance(layer_types, list) and len(layer_types) == n_layers and set(layer_types) <= set(LAYER_TYPES)):
        raise ModelError(f"{where}: key 'layer_types' must list {n_layers} of {', '.join(LAYER_TYPES)}, "
                         f"got {layer_types!r}")
    bias = _flag(cfg, "attention_bias", where)
    return ModelArgs(
        model_type="gemma3_text",
        vocab_size=_number(cfg, "vocab_size", where),
        dim=_number(cfg, "hidden_size", where),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_number(cfg, "intermediate_size", where),
        norm_eps=_number(cfg, "rms_norm_eps", where, kind=float),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        sliding_window=_number(cfg, "sliding_window", where),
        tie_embeddings=_flag(cfg, "tie_word_embeddings", where),
        max_position_embeddings=_number(cfg, "max_position_embeddings", where),
        embed_scale=True,
        norm_offset=True,
        sandwich_norm=True,
        act="gelu_tanh",
        query_pre_attn_scalar=_number(cfg, "query_pre_attn_scalar", where, kind=float),
        layer_types=layer_types,
        **_gemma3_rope(cfg, where),
    )


def _gemma3_rope(cfg, where) -> dict:
    """Global layers: rope_theta and rope_scaling (v4 style) or rope_parameters.full_attention (v5);
    sliding layers: rope_local_base_freq or rope_parameters.sliding_attention, default type only."""
    params = cfg.get("rope_parameters")
    if not (isinstance(params, dict) and "full_attention" in params):
        return _rope_settings(cfg, where) | dict(rope_local_theta=_number(cfg, "rope_local_base_freq", where, kind=float))
    local = params.get("sliding_attention") or {}
    if not isinstance(local, dict) or local.get("rope_type", "default") != "default":
        raise ModelError(f"{where}: key 'rope_parameters.sliding_attention' must be default RoPE, got {local!r}")
    return _rope_settings({"rope_parameters": params["full_attention"]}, where) | dict(
        rope_local_theta=_number(local, "rope_theta", where, 10_000.0, float, prefix="rope_parameters.sliding_attention."))


def config_from_args(args: ModelArgs) -> dict:
    """The inverse of args_from_config: HF config.json keys (transformers v4 style) that give back
    `args` (for a model that has no config.json of its own: a GGUF file, t2t.py export)."""
    if args.model_type == "llama" and args.qkv_bias != args.o_bias:
        raise ModelError(f"a llama model with q/k/v bias {args.qkv_bias} but o_proj bias {args.o_bias} has no "
                         f"HF config (attention_bias covers all four)")
    rope = {"default": None, "linear": dict(rope_type="linear", factor=args.rope_factor),
            "llama3": dict(rope_type="llama3", factor=args.rope_factor, low_freq_factor=args.rope_low_freq_factor,
                           high_freq_factor=args.rope_high_freq_factor,
                           original_max_position_embeddings=args.rope_original_max_pos)}[args.rope_type]
    if args.model_type == "gemma3_text":
        return gemma3_config(args, rope)
    cfg = dict(model_type=args.model_type, architectures=[_ARCHITECTURES[args.model_type]], vocab_size=args.vocab_size,
               hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
               num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, intermediate_size=args.ffn_dim,
               hidden_act="silu", rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, rope_scaling=rope,
               mlp_bias=args.mlp_bias, tie_word_embeddings=args.tie_embeddings,
               max_position_embeddings=args.max_position_embeddings, sliding_window=args.sliding_window)
    if args.model_type in ("llama", "qwen3"):
        cfg["attention_bias"] = args.qkv_bias
    if args.model_type in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = args.sliding_window is not None
    return cfg


def gemma3_config(args: ModelArgs, rope) -> dict:
    """config_from_args for Gemma 3: a gemma3_text config.json (Gemma3ForCausalLM)."""
    return dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=args.vocab_size,
                hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, intermediate_size=args.ffn_dim,
                hidden_activation="gelu_pytorch_tanh", rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                rope_scaling=rope, rope_local_base_freq=args.rope_local_theta, attention_bias=args.qkv_bias,
                # an int where it is one: transformers' Gemma3TextConfig refuses 256.0
                query_pre_attn_scalar=int(q) if (q := args.query_pre_attn_scalar).is_integer() else q,
                sliding_window=args.sliding_window,
                layer_types=list(args.layer_types), tie_word_embeddings=args.tie_embeddings,
                max_position_embeddings=args.max_position_embeddings)


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}



def args_dict(args: ModelArgs) -> dict:
    return asdict(args)


# -----------------------------------------------------------------------------
# Weights: HF names onto our modules, and the checks every loaded tensor passes


# (the published layout, and the one transformers v5 saves) beside the vision tower, which is not read
LANGUAGE_MODEL = {"language_model.model.": "", "model.language_model.": "", "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def hf_to_ours(key: str) -> str | None:
    """The one name mapping: HF keys are ours under a 'model.' prefix (lm_head has none); a
    multimodal Gemma 3's language-model keys likewise; None for its vision tower (left unread)."""
    if key.startswith(VISION_PREFIXES):
        return None
    for prefix, ours in LANGUAGE_MODEL.items():
        if key.startswith(prefix):
            return ours + key.removeprefix(prefix)
    return key.removeprefix("model.")


def ours_to_hf(key: str) -> str:
    return key if key == "lm_head.weight" else "model." + key


def all_finite(t) -> bool:
    """No NaN or inf in t: one min/max reduction (NaN propagates through both, an inf is the max or
    the min), ~20x faster than isfinite().all() on CPU and without its [numel] temporary."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def checked_weight(t, dtype, where):
    """t cast to dtype, refused (ModelError naming `where`) unless floating point and finite after
    the cast (so a value that overflows float16 is caught too). One pass over each tensor as it
    is loaded: no per-step cost."""
    if not t.is_floating_point():
        raise ModelError(f"{where} has dtype {t.dtype}; weights must be floating point")
    out = t.to(dtype)
    if not all_finite(out):
        what = "NaN or infinite values" if not all_finite(t) else f"values too large for {dtype}"
        raise ModelError(f"{where} holds {what}")
    return out
