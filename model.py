"""The decoder LLM, LoRA, pooling and the embedder: the network, written from scratch.

Follows Hugging Face's modeling_llama.py / modeling_mistral.py / modeling_qwen2.py /
modeling_qwen3.py / modeling_gemma3.py (the forward pass is tested against them) and the "Model" section of
the method (README.md, "The method"; Text2Token, arXiv 2510.10224): the embedding of a text is the last layer's hidden
states after the final RMSNorm, mean-pooled (or the last token), with causal or bidirectional
attention; lm_head(h) is its view in token space. Module names are the HF checkpoint's
(config.hf_to_ours), so that loading is a strict copy onto a model built on the meta device (load:
checkpoints.py reads and checks the files, config.py maps config.json onto ModelArgs).

Dimensions: B batch, T tokens, D hidden, H query heads, K key/value heads, hd head dim,
F feed-forward width, V vocabulary, r LoRA rank.

Gemma 3 differs from Llama in named pieces, each switched on by a ModelArgs field: embeddings
scaled by sqrt(D), RMSNorm by (1 + w), four norms per block, RMSNorm of q and k, GeGLU (tanh
GELU), attention scale from query_pre_attn_scalar, sliding-window layers with their own RoPE base.

Not included: KV cache and generation, sliding-window attention beyond the window for
Mistral/Qwen (Gemma 3's sliding layers are real), logit soft-capping (Gemma 2), rope scaling
other than "default", "linear" and "llama3", tensor parallelism, quantisation, Gemma 3's vision
tower; file formats (checkpoints.py, gguf_file.py, files.py), config.json (config.py) and the
tokenizer (tokenizer.py).
"""

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
from config import ModelArgs, args_from_config  # noqa: F401 (args_from_config: model.args_from_config)
from files import ModelError, save_weights_atomic
from tokenizer import Tokenizer, pad_batch  # noqa: F401 (Tokenizer: model.Tokenizer, what load returns)

PROMPT_EOL = 'This sentence : "{text}" means in one word:"'  # PromptEOL (Jiang et al. 2023)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -----------------------------------------------------------------------------
# The transformer


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device: torch's normal_ has no native
    meta kernel, and its Python one imports sympy on first use (~1.3 s and ~80 MB per process,
    BENCHMARKS.md). A model built on meta gets its weights assigned by load (assign_weights) anyway."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset=False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma3RMSNorm: weights centred on 0, x * (1 + w) in fp32, then cast
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        # normalise in fp32, scale in the input dtype (as LlamaRMSNorm does)
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
    """cos, sin [T, hd] for positions 0..T-1 (HF's rotate-half layout)."""
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


def attend(q, k, v, mask, scale=None):
    """One SDPA call: q [B, H, T, hd], k and v [B, H or K, T, hd] (K < H: grouped-query attention,
    each kv head shared by H/K query heads inside the kernel). In bf16 training on CPU it runs in
    fp32 (autocast off for it): there the bf16 kernel's backward is 2-3x slower than fp32's (B=32,
    H=9, T=32, hd=64, forward + backward: 49 vs 16 ms; with the fp32 cast 26 ms;
    bench/bench_bf16_cpu.py), while its forward alone is faster in bf16, so inference (no gradient)
    keeps bf16."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  scale=scale, enable_gqa=gqa).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
        # Gemma 3 scales scores by query_pre_attn_scalar**-0.5 (256 = hd for the 270M; not hd for all sizes)
        self.scale = args.query_pre_attn_scalar ** -0.5 if args.query_pre_attn_scalar else None

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3 and Gemma 3 normalise each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # grouped-query attention: each kv head is shared by H/K query heads. On CPU SDPA's flash
        # kernel shares them itself (enable_gqa: equal outputs, 1.3-1.8x faster, and backward keeps
        # k and v at K heads; BENCHMARKS.md "Memory (CPU)"); on CUDA a boolean mask selects the
        # memory-efficient kernel, which takes no enable_gqa (the math kernel would run), so the
        # heads are repeated there.
        if self.n_kv_heads != self.n_heads and x.device.type != "cpu":
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, hd]
        y = attend(q, k, v, mask, self.scale)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)
        self.gelu = args.act == "gelu_tanh"

    def forward(self, x):
        gate = self.gate_proj(x)
        # SwiGLU (Llama, Qwen) or GeGLU with the tanh GELU (Gemma's gelu_pytorch_tanh)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). Gemma 3's "sandwich" also normalises
    each branch's output: x + post_norm(attn(norm(x))). The HF names differ in meaning: Llama's
    post_attention_layernorm is the MLP's input norm; Gemma's is the attention output's."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(args)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(args)
        if args.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, mask):
        if not hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


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


def sliding_window_mask(attention_mask: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """Gemma 3's sliding layers, boolean [B, 1, T, T] (or the full mask when the window covers every
    pair). Causal: query t sees key s when 0 <= t - s < window (transformers' sliding_window_overlay).
    Bidirectional, as EmbeddingGemma and transformers' use_bidirectional_attention define it: a
    symmetric band |t - s| < window // 2 + 1 (Gemma3TextConfig halves the window, "exclusive
    bounds"; _bidirectional_window_overlay). Padded keys are hidden; each position also sees
    itself, so that no row is fully masked (NaN)."""
    B, T = attention_mask.shape
    reach = window if causal else window // 2 + 1  # |t - s| < reach
    if T <= reach:
        return attention_mask_4d(attention_mask, causal)
    pos = torch.arange(T, device=attention_mask.device)
    dist = pos[:, None] - pos[None, :]  # [T, T] query minus key
    band = (dist >= 0) & (dist < reach) if causal else dist.abs() < reach
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (attention_mask.bool()[:, None, None, :] & band) | eye  # [B, 1, T, T]


def embed_scale(args: ModelArgs, dtype) -> torch.Tensor:
    """Gemma's embedding multiplier sqrt(D), rounded to the weights' dtype as transformers does
    (in bf16, sqrt(640) = 25.30 becomes 25.25): an fp32 scalar cast to `dtype`."""
    return torch.tensor(args.dim ** 0.5, dtype=torch.float32).to(dtype)


def local_rope_args(args: ModelArgs) -> ModelArgs:
    """Sliding layers' RoPE (Gemma 3): the local base, no scaling."""
    return replace(args, rope_theta=args.rope_local_theta, rope_type="default")


class Transformer(nn.Module):
    """A decoder stack; parameter names are the HF checkpoint's without the 'model.' prefix."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False

    def forward(self, input_ids, attention_mask=None, causal=False):
        """input_ids [B, T] long, attention_mask [B, T] (1 = real token) -> hidden [B, T, D]
        after the final norm."""
        B, T = input_ids.shape
        args = self.args
        if args.layer_types is None and args.sliding_window is not None and T > args.sliding_window:
            raise ModelError(f"sequence of {T} tokens exceeds the sliding window "
                             f"({args.sliding_window}), which is not implemented")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        # per layer type: (cos, sin, mask); Llama-style models have full layers only
        inputs = {"full_attention": (*rope_cos_sin(args, T, input_ids.device),  # [T, hd] each
                                     attention_mask_4d(attention_mask, causal))}  # [B, 1, 1 or T, T]
        if args.layer_types and "sliding_attention" in args.layer_types:
            inputs["sliding_attention"] = (*rope_cos_sin(local_rope_args(args), T, input_ids.device),
                                           sliding_window_mask(attention_mask, causal, args.sliding_window))
        x = self.embed_tokens(input_ids)  # [B, T, D]
        if args.embed_scale:
            x = x * embed_scale(args, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin, mask = inputs[args.layer_types[i] if args.layer_types else "full_attention"]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def token_logits(self, h):
        """h [B, D] -> logits [B, V] over the vocabulary, in fp32 (the paper's token-space view z(x) = lm_head(h))."""
        w = self.lm_head.weight  # [V, D]
        with torch.autocast(h.device.type, enabled=False):
            if w.dtype != torch.float32 and not w.requires_grad and torch.is_grad_enabled():
                return HeadFP32.apply(h.float(), w)
            return F.linear(h.float(), w.float())


class HeadFP32(torch.autograd.Function):
    """logits = h @ W.float().T for a frozen 16-bit head W [V, D]. F.linear(h, W.float()) would keep
    its fp32 copy of W (V x D x 4 bytes: 113 MB for SmolLM2, 671 MB for Gemma 3 270M) from forward to
    backward for the gradient of h; this casts W again in backward instead (the same product)."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(w)
        return F.linear(h, w.float())  # [B, V]

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w.float(), None  # [B, D]; W is frozen


def compile_layers(model: Transformer, backend="inductor", mode=None):
    """torch.compile each decoder layer in place (opt-in: `t2t.py train --compile`, `evaluate.py
    --compile`, Embedder.compile). Per layer, not the whole model: the layers differ only in their
    weights, which dynamo passes to one graph as inputs, so the compile time is one layer's
    whatever the depth; nn.Module.compile keeps every parameter name (no `_orig_mod.` prefix in
    checkpoints), and gradient checkpointing wraps the compiled layers as it wraps eager ones.
    The embedding, the final norm and the LM head stay eager: one op each, nothing to fuse.

    dynamic=True: every batch has its own T (length-sorted encoding, length-grouped training) and
    the last batch its own B, so a graph specialised to one shape would be recompiled at the
    second batch; symbolic B and T from the start give one graph per mode (sizes 0 and 1 are
    still specialised). The modes that each get a graph: training (layer 0's input needs no
    gradient, the others' do), no_grad with the adapter off (the stage-2 teacher), eval.
    mode: torch.compile's (None; "reduce-overhead" adds CUDA graphs, one per shape, against the
    kernel-launch bound of small models on a GPU: bench/gpu_check.py)."""
    # fallback_random: inductor keeps random ops (dropout's draw_keep_mask) in program order, so a
    # compiled step draws the masks an eager one draws
    options = {"fallback_random": True} if backend == "inductor" else None
    for layer in model.layers:
        layer.compile(backend=backend, mode=mode, dynamic=True, options=options)
    return model


# -----------------------------------------------------------------------------
# Loading: a strict copy onto a model built on the meta device


def load(path, device="cpu", dtype=torch.float32):
    """Any HF checkpoint folder of a supported family, a llama.cpp GGUF file, a model name
    (checkpoints.resolve_model) or a run directory -> (Transformer, Tokenizer), one copy of the
    weights: the model is built on the meta device, and the checked tensors are assigned to it."""
    path = checkpoints.resolve_model(path)
    if checkpoints.is_run_dir(path):
        return load_run(path, device, dtype)
    ckpt = checkpoints.Checkpoint(path)  # config (ModelArgs) read and checked against the tensor shapes
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    assign_weights(model, ckpt.read_weights(weight_shapes(model), device, dtype))
    return model.eval(), ckpt.tokenizer()


def weight_shapes(model) -> dict:
    """{name: shape} of every tensor a checkpoint must hold for `model` (a tied head is the embedding)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def assign_weights(model, state):
    """The strict copy: every parameter named, no other name. A tied head is given the embedding's
    tensor for the check, then tied to the embedding's parameter (one tensor, as HF ties it)."""
    if model.args.tie_embeddings:
        state = state | {"lm_head.weight": state["embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if model.args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def load_run(path, device="cpu", dtype=torch.float32):
    """A run directory of t2t.py train -> (Transformer, Tokenizer), rebuilt from what it was trained
    from: stage 2 loads its stage-1 run (which merges its own adapter), then applies and merges its
    own adapter; full fine-tuning assigns its model.safetensors over the base."""
    path = Path(path)
    meta = checkpoints.read_run(path)  # every meta.json down to the base, the weights' manifest
    model, tok = load(checkpoints.run_source(path), device, dtype)
    if lora := meta.get("lora"):
        try:
            add_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=0.0, targets=lora["targets"])
        except ModelError as e:  # a target that matches no layer: name the key it came from
            raise ModelError(f"{path / 'meta.json'}: key 'lora.targets': {e}") from None
        load_lora(model, path / "adapter.safetensors")
        merge_lora(model)
    else:
        config = checkpoints.base_checkpoint_dir(path) / "config.json"
        state = checkpoints.read_weights([path / "model.safetensors"], weight_shapes(model), device, dtype, config)
        assign_weights(model, state)
    return model.eval(), tok


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) B A dropout(x), B starts at zero


class Dropout16(nn.Module):
    """Inverted dropout whose keep-mask comes from 16-bit random integers, four per 64-bit draw.
    On CPU, nn.Dropout's bernoulli_ costs as much as a LoRA step's matmuls (8 ms vs 0.75 ms per
    [32, 32, 576] mask, BENCHMARKS.md); this is the same operation at a 2**-16 resolution of p:
    an element is kept with probability 1 - round(p * 65536) / 65536 and scaled by its inverse,
    so the expected output is x."""

    def __init__(self, p: float, site: str = ""):
        super().__init__()
        if not 0 <= p < 1:
            raise ModelError(f"dropout {p} must be in [0, 1)")
        self.cut = round(p * 65536)  # draws below this (of 65536) are dropped
        self.scale = 65536 / (65536 - self.cut)
        self.site = site  # the adapter's name (draw_keep_mask)

    def forward(self, x):
        if not self.training or self.cut == 0:
            return x
        # where() keeps the bool mask for backward (1 byte an element); x * mask.to(x.dtype) kept a
        # copy of it in x's dtype (2-4 bytes), an eighth of a layer's saved tensors (BENCHMARKS.md,
        # "Memory (CPU)"). The values are the same: x * scale where kept, 0 where dropped.
        return torch.where(draw_keep_mask(x.shape, self.cut, self.site, x.device), x * self.scale, 0.0)


@torch.library.custom_op("text2token::draw_keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def draw_keep_mask(shape: list[int], cut: int, site: str, device: torch.device) -> torch.Tensor:
    """Dropout16's keep-mask, bool [shape]: True where a uniform 16-bit draw is >= cut.

    A custom op, so that torch.compile runs this very code: dynamo cannot trace random_, and
    inductor's own generator made a compiled CPU step slower than eager (1.42 vs 1.23 s; 0.71
    this way); compiled and eager runs also draw the same masks, in the same order. `site` only
    keeps the masks apart: q, k and v see the same input, and the compiler merges calls with equal
    arguments into one (common-subexpression elimination); the site names differ within a layer
    and repeat across layers, so all layers still share one graph."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return draws >= cut - 32768


@draw_keep_mask.register_fake
def _draw_keep_mask_shape(shape, cut, site, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


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
                lora.lora_dropout = Dropout16(dropout, child_name)
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
    """Load an adapter saved by save_lora into `model`'s adapters (add_lora first); every key must match."""
    checkpoints.copy_adapter(lora_state_dict(model), path)


def save_lora(model, path):
    save_weights_atomic(lora_state_dict(model), path)


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
    'last' takes the last token, by default with the PromptEOL template. One loaded with the
    settings it was trained or exported with: Embedder.from_run / .from_pretrained."""

    def __init__(self, model, tokenizer, pooling="mean", causal=False, max_length=512, prompt=None):
        if pooling not in ("mean", "last"):
            raise ModelError(f"pooling {pooling!r} is not supported (mean or last)")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.causal, self.max_length = pooling, causal, max_length
        self.prompt = PROMPT_EOL if (prompt is None and pooling == "last") else prompt
        self.dim = model.args.dim

    @classmethod
    def from_pretrained(cls, path, pooling=None, attention=None, max_length=None, prompt=None,
                        device="cpu", dtype=torch.float32):
        """An HF checkpoint folder, GGUF file or model name -> Embedder; settings not given come from its
        text2token.json (written by `t2t.py export`) or default to mean pooling, bidirectional
        attention, 512 tokens. A run directory goes to from_run."""
        given = dict(pooling=pooling, attention=attention, max_length=max_length, prompt=prompt)
        path = checkpoints.resolve_model(path)
        if checkpoints.is_run_dir(path):
            return cls.from_run(path, device, dtype, **given)
        saved = checkpoints.read_settings(path)
        return cls.with_settings(*load(path, device, dtype), saved, given)

    @classmethod
    def from_run(cls, run_dir, device="cpu", dtype=torch.float32, **given):
        """A run directory's model with the attention, pooling and prompt it was trained with
        (meta.json's "embedding"); settings given that are not None win."""
        saved = checkpoints.read_run_meta(run_dir).get("embedding", {})
        return cls.with_settings(*load(run_dir, device, dtype), saved, given)

    @classmethod
    def with_settings(cls, model, tokenizer, saved: dict, given: dict):
        s = saved | {k: v for k, v in given.items() if v is not None}
        return cls(model, tokenizer, s.get("pooling", "mean"), attention_is_causal(s.get("attention", "bidirectional")),
                   s.get("max_length", 512), s.get("prompt"))

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def settings(self) -> dict:
        return dict(attention="causal" if self.causal else "bidirectional", pooling=self.pooling,
                    prompt=self.prompt, max_length=self.max_length)

    def compile(self, backend="inductor"):
        """torch.compile the model's layers (compile_layers) -> self. The first batches pay the
        compile time (tens of seconds on CPU), so it pays off on large corpora only."""
        compile_layers(self.model, backend)
        return self

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
