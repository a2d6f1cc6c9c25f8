"""Our Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2), with Hugging Face parameter names.

One file, plain PyTorch. The same module is the policy (LM head, `lm_head`) and the reward model
(`score` head, one scalar per sequence read at the last real token). Parameter names equal
`transformers`' LlamaForCausalLM / LlamaForSequenceClassification, so a checkpoint's state dict
loads strictly with no key map (see mt/checkpoint.py).
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mt.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(UserError):
    """A model config we cannot run; the message names the field and what to change."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    # transformers' default for all three families, when config.json omits it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...} or None
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # Llama's `attention_bias` puts a bias on q/k/v *and* o
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    head: str = "lm"  # "lm" (policy) | "score" (reward model)
    num_labels: int = 1
    model_type: str = "llama"
    hf: dict = field(default_factory=dict, repr=False)  # the source config.json, kept for saving

    @classmethod
    def from_hf(cls, d: dict, head: str | None = None,
                source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config dict (transformers 4.x or 5.x spelling)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type={mt!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
            if not isinstance(d.get(k), int):
                raise ConfigError(f"{source}: field {k!r} is missing or not an integer")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (only "
                              "'silu')")
        # Sliding-window attention changes which keys a query sees;
        # we only implement full attention.
        sliding = d.get("use_sliding_window", True) and d.get("sliding_window") is not None
        if sliding:
            raise ConfigError(
                f"{source}: sliding_window={d['sliding_window']} asks for sliding-window "
                "attention, which this model does not implement. If every sequence you use is "
                "shorter than the window, attention is identical: set \"sliding_window\": null in "
                "config.json.")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})  # 5.x | 4.x
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        n_heads = d["num_attention_heads"]
        arch = (d.get("architectures") or [""])[0]
        if arch and not arch.endswith(("ForCausalLM", "ForSequenceClassification")):
            raise ConfigError(f"{source}: architectures={d['architectures']} is not supported; "
                              "expected a *ForCausalLM (policy) or *ForSequenceClassification "
                              "(reward model)")
        is_rm = arch.endswith("ForSequenceClassification")
        if head is None:
            head = "score" if is_rm else "lm"
        if head not in ("lm", "score"):
            raise ConfigError(f"head must be 'lm' or 'score', got {head!r}")
        # a causal LM's id2label (if any) says nothing about the fresh score head we would give it
        num_labels = d.get("num_labels", len(d.get("id2label") or {}) or 1)
        if head == "score" and is_rm and num_labels != 1:
            raise ConfigError(f"{source}: a reward model needs num_labels=1 (one scalar), got "
                              f"{num_labels}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            qkv_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=mt != "qwen2" and bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head=head, num_labels=1, model_type=mt, hf=dict(d),
        )


# ---- rotary position embedding


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1 / linear scaling where the config asks."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); computed in fp32."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by the half-split convention Hugging Face checkpoints use."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- KV cache


class KVCache(nn.Module):
    """A preallocated cache of `n_slots` rows of `max_len` positions;
    row s holds one sequence from 0.

    k and v are (layers, n_slots, kv heads, max_len, head_dim), every layer in one tensor, so a
    copy or a reorder of rows is one indexed assignment (`k[:, dst, :, :n] = k[:, src, :, :n]`).
    Keys at positions > a query's position are masked, so a slot is reused without clearing it.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype, device=None):
        super().__init__()
        shape = self.shape(cfg, n_slots, max_len)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    @staticmethod
    def shape(cfg: ModelConfig, n_slots: int, max_len: int) -> tuple[int, ...]:
        """k's (and v's) shape: (layers, n_slots, kv heads, max_len, head_dim); mt/plan.py sizes it too."""
        return (cfg.num_hidden_layers, n_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)


QUERY_BLOCK = 128  # FlexAttention's default query block


class PagedKVCache(nn.Module):
    """A pool of `n_blocks` blocks of `block` positions that rows take as they grow (mt/sampler.py
    hands them out), and `table` (n_slots, max_len // block): the blocks that hold positions
    [0, block), [block, 2 block), ... of each row. Block 0 is scratch, never a row's: a table entry
    not in use points there, so an idle row's or a pad token's write lands nowhere that is read.

    k and v are (layers, 1, kv heads, n_blocks * block, head_dim): one sequence axis for every row,
    what FlexAttention reads through a block mask (`block_mask`), so each row's keys are read where
    they lie, only its own blocks, never copied or padded to the longest row (the dense KVCache
    reads every row over the longest row's window). That is the CUDA path (`flex`, compiled).
    Elsewhere FlexAttention is an uncompiled reference at ~20 ms a call, so each row's blocks are
    gathered in order and read like a dense window (`gathered`): the same keys, a copy per layer.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, n_blocks: int, block: int, max_len: int, dtype,
                 device=None):
        super().__init__()
        shape = self.shape(cfg, n_blocks, block)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.block, self.n_blocks = block, n_blocks
        self.max_len = -(-max_len // block) * block
        self.table = torch.zeros(n_slots, self.max_len // block, dtype=torch.long, device=device)
        dev = torch.device(device or "cpu")
        self.flex = self.use_flex or (dev.type == "cuda" and flex_compiles(
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, dtype, dev))
        if self.flex:  # what the mask reads, rewritten in place by each forward: one mask_mod
            # function for the cache's life, so compiled FlexAttention never recompiles for a new one
            self.logical = torch.zeros(n_slots, n_blocks, dtype=torch.long, device=device)
            self.q_pos = torch.zeros(n_slots, -(-self.max_len // QUERY_BLOCK) * QUERY_BLOCK,
                                     dtype=torch.long, device=device)
            logical, q_pos, bs = self.logical, self.q_pos, block

            def mask_mod(b, h, q_idx, kv_idx):  # a key in the row's blocks, at or before the query
                lb = logical[b, kv_idx // bs]
                return (lb >= 0) & (lb * bs + kv_idx % bs <= q_pos[b, q_idx])
            self.mask_mod = mask_mod

    use_flex = False  # tests set it to run the CUDA path's FlexAttention (uncompiled) on CPU
    whole = False  # gathered: read every row's whole table (static shapes for --sampling.compile)

    @staticmethod
    def shape(cfg: ModelConfig, n_blocks: int, block: int) -> tuple[int, ...]:
        """k's (and v's) shape: (layers, 1, kv heads, n_blocks * block, head_dim)."""
        return (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, n_blocks * block, cfg.head_dim)

    def where(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The pool index of each position (B, T) of rows with block tables `table` (B, n)."""
        return table.gather(1, positions // self.block) * self.block + positions % self.block

    def block_mask(self, table: torch.Tensor, positions: torch.Tensor) -> BlockMask:
        """What the queries at `positions` (B, T) of rows `table` (B, n) may read: their row's blocks
        (the kernel visits only those, in order), and in them the positions up to their own.
        `logical` maps a pool block back to its place in the row (-1: not the row's); an idle row
        (all scratch) reads scratch position 0, so no query sees nothing."""
        B, T = positions.shape
        nq = -(-T // QUERY_BLOCK)
        logical, q_pos = self.logical[:B], self.q_pos[:B]
        logical.fill_(-1).scatter_(1, table, torch.arange(table.shape[1], device=table.device).expand_as(table))
        logical[:, 0] = torch.where(table[:, 0] == 0, 0, -1)  # scratch: an idle row's only block
        q_pos[:, :T] = positions  # past T: padded queries, whose output is dropped
        used = (positions.amax(1) // self.block + 1).to(torch.int32)  # (B,) blocks up to the last query
        return BlockMask.from_kv_blocks(
            used[:, None, None].expand(B, 1, nq).contiguous(),
            table.to(torch.int32)[:, None, None, :].expand(B, 1, nq, table.shape[1]).contiguous(),
            BLOCK_SIZE=(QUERY_BLOCK, self.block), mask_mod=self.mask_mod,
            seq_lengths=(T, self.n_blocks * self.block), compute_q_blocks=False)


    def step(self, table: torch.Tensor, positions: torch.Tensor, rep: int, dtype) -> "PagedStep":
        """What one forward of rows `table` (B, n) at `positions` (B, T) writes and reads."""
        write = self.where(table, positions)
        if self.flex:
            return PagedStep(write, self.block_mask(table, positions))
        # the blocks up to the furthest query: a host read, free on CPU (static: all of them)
        n = table.shape[1] if self.whole else int(positions.max()) // self.block + 1
        keys = torch.arange(n * self.block, device=positions.device)
        read = self.where(table[:, :n], keys.expand(len(table), -1))  # (B, n * block), in order
        bias = attention_bias(keys[None, None, :] <= positions[:, :, None], rep, dtype)
        return PagedStep(write, bias, read)


@dataclass
class PagedStep:
    """One forward's use of a PagedKVCache: pool indices the tokens (B, T) are written at; the block
    mask (flex) or the additive mask and the pool indices (B, Tk) of each row's keys (gathered)."""
    write: torch.Tensor
    mask: BlockMask | torch.Tensor
    read: torch.Tensor | None = None


@functools.cache
def _flex_compiled():
    """FlexAttention compiled: on CUDA the fused Triton kernel that skips blocks outside the mask.
    Uncompiled, flex_attention is a reference that materialises every score (what CPU runs).
    Default dynamic: a packed row's length and a decode step's rows change from call to call, and
    after the first recompile dynamo marks them dynamic instead of compiling each one until its
    cache limit sends the rest to the eager path."""
    return torch.compile(flex_attention)


@functools.cache
def flex_compiles(hq: int, hk: int, d: int, dtype, device) -> bool:
    """Does compiled FlexAttention run here at this model's head shape, forward and backward? A
    one-block probe before a stage relies on it: where it cannot (no Triton, an unsupported GPU),
    the paged cache gathers each row's blocks and a packed batch takes the dense mask, both read
    through SDPA instead (the same results, more memory traffic), and it says so once, rather than
    a stage failing at 8B."""
    try:
        with torch.enable_grad():
            q = torch.zeros(1, hq, 128, d, dtype=dtype, device=device, requires_grad=True)
            kv = torch.zeros(1, hk, 128, d, dtype=dtype, device=device, requires_grad=True)
            mask = create_block_mask(lambda b, h, q, k: k <= q, 1, None, 128, 128, device=device)
            flex_attend(q, kv, kv, mask).sum().backward()
        return True
    except Exception as e:  # noqa: BLE001 -- any failure of the compile stack means: do not use it
        print(f"warning: compiled FlexAttention does not run on {device} ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); the paged KV cache reads through SDPA "
              "instead (slower; the same tokens)", file=sys.stderr, flush=True)
        return False


def flex_attend(q, k, v, mask: BlockMask) -> torch.Tensor:
    """FlexAttention: compiled on CUDA (fused by construction), the reference elsewhere."""
    attend = _flex_compiled() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def kv_bytes_per_position(cfg: ModelConfig, elem_bytes: int) -> int:
    """K and V of one position in every layer: what any KV cache holds per token (the sampler's
    caches and mt/plan.py size themselves by it)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


def attention_bias(allowed: torch.Tensor, rep: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask (B, 1, rep*T, Tk) in the queries' dtype for allowed (B, T, Tk):
    0 where a query may see a key, -inf elsewhere, repeated for the `rep` query heads that
    Attention.forward folds into the query axis of their shared K/V head.

    Additive and in q's dtype: what the memory-efficient kernel takes as its bias (a bool mask is
    converted to this anyway). Stored with rows padded to 8 elements, so that kernel's alignment
    check passes without a padded copy per layer. One query per row (a decode step) repeats by
    expand: no copy. Every row sees at least one key (its own position), so no row is all -inf.
    """
    B, T, Tk = allowed.shape
    blocked = ~allowed[:, None]  # (B, 1, T, Tk)
    if rep > 1 and T > 1:
        blocked = blocked.repeat(1, 1, rep, 1)  # (B, 1, rep*T, Tk): query (r, t) is row r*T + t
    rows, Tk8 = blocked.shape[2], -(-Tk // 8) * 8
    bias = torch.zeros(B, 1, rows, Tk8, dtype=dtype, device=allowed.device)[..., :Tk]
    bias.masked_fill_(blocked, float("-inf"))
    return bias.expand(B, 1, rep, Tk) if rep > 1 and T == 1 else bias


def segment_mask(doc: torch.Tensor, branch: torch.Tensor, rep: int, dtype: torch.dtype,
                 flex: bool | None = None):
    """The mask of a packed batch (mt/packing.py) from its document ids and branches (R, W): a
    query sees the keys before it in its row that are in its document and either shared (branch 0,
    a pair's prompt) or on its own branch (chosen or rejected). Padding is a document of its own
    (id -1), so no query is fully masked.

    The attention backend, decided here: on CUDA a FlexAttention block mask, so the kernel skips
    the blocks between documents and takes grouped-query heads as they are (a dense mask would
    send SDPA to the memory-efficient kernel at full (W, W) cost, or to the math kernel with GQA);
    elsewhere SDPA's additive mask in q's dtype with the grouped heads folded into the queries
    (attention_bias), the masked branch of Attention that tests/test_attention_contract.py holds
    to a fused kernel; there mt/packing.py makes rows only as wide as the longest document, so the
    dense mask costs rows × W², what a padded batch of those documents would cost. `flex` None =
    on CUDA (Transformer.forward passes False where compiled FlexAttention cannot run)."""
    if doc.is_cuda if flex is None else flex:
        def mask_mod(b, h, q, k):
            same = (doc[b, q] == doc[b, k]) & (k <= q)
            return same & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        R, W = doc.shape
        return create_block_mask(mask_mod, R, None, W, W, device=doc.device)
    causal = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool, device=doc.device).tril()
    allowed = (causal[None] & (doc[:, :, None] == doc[:, None, :])
               & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])))
    return attention_bias(allowed, rep, dtype)  # (R, 1, rep*W, W)


# ---- the transformer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 then cast back before the weight, as the reference implementation does
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for fp64 weights
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                            cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache=None, slots=None, positions=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, PagedStep):  # the paged cache: every row's blocks on one axis
            k_pool, v_pool = cache  # (1, nkv, N, hd)
            k_pool[0][:, mask.write.flatten()] = k.transpose(0, 1).flatten(1, 2)  # (nkv, B*T, hd)
            v_pool[0][:, mask.write.flatten()] = v.transpose(0, 1).flatten(1, 2)
            if mask.read is None:
                y = flex_attend(q, k_pool, v_pool, mask.mask)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
            k, v, mask = k_pool[0][:, mask.read].transpose(0, 1), v_pool[0][:, mask.read].transpose(0, 1), mask.mask
        # write this step's keys at each row's own positions, attend over the slot
        elif cache is not None:
            k_cache, v_cache = cache
            rows = (slots[:, None] if slots is not None
                    else torch.arange(B, device=x.device)[:, None])
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
            k, v = (k_cache, v_cache) if slots is None else (k_cache[slots], v_cache[slots])
        if isinstance(mask, BlockMask):  # a packed batch on CUDA (segment_mask)
            y = flex_attend(q, k, v, mask)
        elif mask is None:  # training, scoring, the reference pass: causal, right-padded, no mask;
            # on CUDA flash takes it, grouped-query heads included (enable_gqa)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.n_kv != self.n_heads)
        else:
            # A mask (the sampler's cache, left padding) rules flash out, and the memory-efficient
            # kernel takes no enable_gqa on most releases we allow (torch >= 2.6), which leaves the
            # math kernel (fp32, K/V repeated per query head). So no grouped heads reach SDPA here:
            # the `rep` query heads that share a K/V head become `rep` blocks of queries of that
            # one head, (B, nh, T, hd) -> (B, nkv, rep*T, hd). Same dot products, K/V neither
            # copied nor expanded, and equal head counts with an additive mask in q's dtype, which
            # the memory-efficient kernel accepts (tests/test_attention_contract.py). The mask
            # comes folded the same way (Transformer.forward, attention_bias).
            rep = self.n_heads // self.n_kv
            q = q.reshape(B, self.n_kv, rep * T, self.hd)  # (B, nkv, rep*T, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, T, self.hd)  # back to (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, slots=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in Hugging Face naming: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        elif cfg.head == "score":
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            raise ConfigError(f"head must be 'lm' or 'score', got {cfg.head!r}")
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() / to_empty() would also cast or blank the rope frequencies; rebuild
        # them in fp32 (as transformers keeps them) so angles at long positions stay exact in any
        # parameter dtype.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def tie_weights(self):
        """Re-share lm_head with the embeddings
        (after moving off the meta device, which unties them)."""
        if self.cfg.head == "lm" and self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02):
        """Random init (tests, fresh score heads);
        pretrained weights come from mt/checkpoint.py."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                slots=None, return_hidden: bool = False, segments=None):
        """Logits (B, T, V) for the LM head, per-token scores (B, T) for the score head.

        attention_mask (B, T), 1 for real tokens, handles left and right padding (positions count
        real tokens only). With `cache`, `positions` (B, T) say where each row's tokens go in its
        slot (`slots` (B,) picks cache rows; None = all rows in order) and each query sees its
        slot's keys up to its own position. `segments` = (doc, branch) (B, T) is a packed batch
        (mt/packing.py; its `positions` restart per document): attention stays inside a document's
        branch (segment_mask). Without any of these, the batch is causal from position 0 (right
        padding needs no mask: real tokens never attend to the pads after them).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        allowed = mask = None
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if isinstance(cache, PagedKVCache):  # written and read through each row's block table
            table = cache.table[:B] if slots is None else cache.table[slots]
            mask = cache.step(table, positions, rep, x.dtype)
        elif cache is not None:
            if positions is None:
                raise ValueError("a cached forward needs explicit positions (B, T)")
            key_pos = torch.arange(cache.max_len, device=dev)
            allowed = key_pos[None, None, :] <= positions[:, :, None]  # (B, T, Tmax)
        elif attention_mask is not None:
            am = attention_mask.bool()
            if positions is None:
                positions = (am.long().cumsum(-1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            # a pad query sees itself only, so no row is fully masked (which would give NaN)
            allowed = ((causal[None] & am[:, None, :])
                       | torch.eye(T, dtype=torch.bool, device=dev)[None])  # (B, T, T)
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if allowed is not None:
            mask = attention_bias(allowed, rep, x.dtype)  # (B, 1, rep*T, Tk), built once
        elif segments is not None:
            c = self.cfg  # FlexAttention on CUDA where its compiled kernel runs (flex_compiles)
            flex = dev.type == "cuda" and flex_compiles(c.num_attention_heads, c.num_key_value_heads,
                                                        c.head_dim, x.dtype, dev)
            mask = segment_mask(*segments, rep, x.dtype, flex)  # built once for every layer
        if positions is None:
            positions = torch.arange(T, device=dev)[None].expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        k_cache, v_cache = (None, None) if cache is None else (cache.k, cache.v)  # (L, B, H, T, D)
        for i, block in enumerate(self.model.layers):
            kv = (k_cache[i], v_cache[i]) if cache is not None else None
            x = block(x, cos, sin, mask, kv, slots, positions)
        x = self.model.norm(x)
        if return_hidden:
            return x
        if self.cfg.head == "lm":
            return self.lm_head(x)
        # a fresh tensor, not squeeze's view: FSDP2 warns that a view returned by a root forward
        # "can produce wrong gradients", and that warning must not drown out a real one
        return self.score(x).squeeze(-1).clone()

    def rewards(self, input_ids, attention_mask=None, lengths=None):
        """Reward-model score per sequence (B,), read at each row's last real token.

        The last real token comes from explicit lengths (right padding) or the attention mask
        (either side), never from searching for a pad id: pad == eos would otherwise pick the wrong
        position.
        """
        assert self.cfg.head == "score", "rewards() needs a model with a score head"
        B, T = input_ids.shape
        if attention_mask is None:
            if lengths is None:
                raise ValueError("rewards() needs lengths or an attention_mask")
            attention_mask = torch.arange(T, device=input_ids.device)[None] < lengths[:, None]
            right_padded = True
        else:
            right_padded = bool(attention_mask[:, 0].all())  # host sync, once per batch
        per_token = self(input_ids,
                         attention_mask=None if right_padded else attention_mask)  # (B, T)
        last = (torch.arange(T, device=input_ids.device)[None] * attention_mask.long()).argmax(-1)
        return per_token.gather(1, last[:, None]).squeeze(1)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n
