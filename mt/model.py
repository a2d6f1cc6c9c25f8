"""Our Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2), with Hugging Face parameter names.

One file, plain PyTorch. The same module is the policy (LM head, `lm_head`) and the reward model
(`score` head, one scalar per sequence read at the last real token). Parameter names equal
`transformers`' LlamaForCausalLM / LlamaForSequenceClassification, so a checkpoint's state dict
loads strictly with no key map (see mt/checkpoint.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mt.errors import UserError

# eager flex_attention materialises the whole score matrix (the reference implementation); the
# compiled one is the fused kernel that skips masked blocks. Default dynamic: a packed row's
# length changes per micro-batch, and after the first recompile dynamo marks it dynamic instead
# of compiling each length until its cache limit sends the rest to the eager path.
_flex_compiled = torch.compile(flex_attention)

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
    on CUDA."""
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
        # write this step's keys at each row's own positions, attend over the slot
        if cache is not None:
            k_cache, v_cache = cache
            rows = (slots[:, None] if slots is not None
                    else torch.arange(B, device=x.device)[:, None])
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
            k, v = (k_cache, v_cache) if slots is None else (k_cache[slots], v_cache[slots])
        if isinstance(mask, BlockMask):  # a packed batch on CUDA (segment_mask)
            y = _flex_compiled(q, k, v, block_mask=mask, enable_gqa=self.n_kv != self.n_heads)
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
        if cache is not None:
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
            mask = segment_mask(*segments, rep, x.dtype)  # built once for every layer
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
