"""tests/tools/convert_gguf.py (test tooling) against references: transformers' own GGUF loader and tokenizer on the packaged
SmolLM2 file, an independent torch dequantiser, llama.cpp's pre-tokenizer regexes, and a tiny
random Llama written to GGUF (with llama.cpp's q/k permutation) and converted back.

Set MT_SMOLLM2_DIR to a directory made by `python tests/tools/convert_gguf.py --smollm2 DIR` to reuse it.
"""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf import dequant as hf_dequant
from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from tools.convert_gguf import (MARKER, GGUFConversionError, convert, ensure_smollm2, file_sha256, is_converted,
                             main, smollm2_gguf_path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (HF q/k rows -> llama.cpp's rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- fixtures: the packaged SmolLM2 and transformers' GGUF loader on the same file

@pytest.fixture(scope="module")
def ours(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF path: config and tokenizer via `gguf_file=`, weights via `load_gguf_checkpoint`.

    `from_pretrained(..., gguf_file=)` for the model refuses to run without `accelerate` (not
    installed); for Llama it then calls exactly `load_gguf_checkpoint`, so we call that ourselves.
    """
    path = smollm2_gguf_path()
    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)  # lm_head is tied to embed_tokens
    return cfg, tok, model, state


# ---- the packaged SmolLM2 file

def test_config_matches_transformers_gguf_config(smollm2_dir, ours, reference):
    cfg = ours[1].config
    ref = reference[0]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert cfg.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert ours[0].convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert gen["eos_token_id"][0] == ref.eos_token_id and gen["pad_token_id"] == ref.pad_token_id


def test_state_dict_equals_transformers_gguf_loader(ours, reference):
    state = ours[1].state_dict()
    ref = reference[3]
    assert set(ref) == {k for k in state if k != "lm_head.weight"}  # tied: no lm_head in either file
    for name, w in ref.items():
        assert torch.equal(state[name], w), name
    assert ours[1].lm_head.weight.data_ptr() == ours[1].model.embed_tokens.weight.data_ptr()


def test_dequantisation_matches_independent_torch_kernel(ours):
    """transformers' own GGUF reader and torch dequantiser (no `gguf` package) on the raw bytes, with
    llama.cpp's permutation re-applied to our q/k, must give our weights back."""
    cfg, state = ours[1].config, ours[1].state_dict()
    header = GgufHeader.from_file(str(smollm2_gguf_path()))
    raw = load_gguf_state_dict(header)
    keep = ("blk.0.", f"blk.{cfg.num_hidden_layers - 1}.")  # first and last layer: all of it is slow on CPU
    seen = set()
    for info in header.tensors:
        if info.name.startswith("blk.") and not info.name.startswith(keep):
            continue
        data = raw[info.name][...]
        want = data if info.ggml_type == 0 else hf_dequant.dequantize(data.reshape(-1), info.ggml_type)
        name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(
            info.name)
        if name is None:
            i, rest = info.name.split(".", 2)[1:]
            name = f"model.layers.{i}." + {
                "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}[rest]
        got = state[name]
        if info.name.endswith("attn_q.weight"):
            got = llamacpp_permute(got, cfg.num_attention_heads)
        elif info.name.endswith("attn_k.weight"):
            got = llamacpp_permute(got, cfg.num_key_value_heads)
        torch.testing.assert_close(got, want.reshape(info.shape), rtol=0, atol=1e-6, msg=name)
        seen.add(info.ggml_type)
    assert seen == {0, hf_dequant.GGML_Q4_1, hf_dequant.GGML_Q8_0}  # F32, Q4_1, Q8_0: all the file holds


def test_logits_equal_transformers_gguf_loader(ours, reference):
    tok, model = ours
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        got = model(**ids).logits
        want = reference[2](**ids).logits
    assert got.shape == (1, ids["input_ids"].shape[1], 49152)
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_generation_answers_paris_and_stops(ours, smollm2_dir):
    tok, model = ours
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=30, do_sample=False)  # eos list from generation_config
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
    assert new[-1] == im_end and im_end not in new[:-1] and len(new) < 30


def llamacpp_smollm_split(text: str) -> list[str]:
    """llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM: split off every digit, then GPT-2's regex."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    return [w for part in regex.split(r"(\p{N})", text) if part for w in regex.findall(gpt2, part)]


TEXTS = ["Hello world", "The year 2024 had 366 days.", "naïve café – 東京 🙂",
         "  lead\n\n\ttabs  and   spaces ", "def f(x):\n    return x**2  # square", "It's we'll they'd", "a1b2c3 3.14159"]


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference):
    tok, ref = ours[0], reference[1]
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]:
        assert tok(text).input_ids == ref(text).input_ids, text
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(tok, name) == getattr(ref, name), name


def test_tokenizer_follows_llamacpp_digit_split(ours, reference):
    """Where transformers' GGUF tokenizer drops llama.cpp's digit split ("x  12": it yields Ġ Ġ, llama.cpp
    and the original SmolLM2 tokenizer ĠĠ), we follow llama.cpp: its regexes, then BPE per piece."""
    tok, ref = ours[0], reference[1]
    for text in TEXTS + ["x  12", "v  2.0\n  3"]:
        want = [i for piece in llamacpp_smollm_split(text) for i in ref(piece, add_special_tokens=False).input_ids]
        assert tok(text, add_special_tokens=False).input_ids == want, text
    assert tok.convert_ids_to_tokens(tok("x  12").input_ids) == ["x", "ĠĠ", "1", "2"]


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(ours):
    tok = ours[0]
    for text in TEXTS + ["<|im_start|>system\n<|im_end|><|endoftext|>"]:
        assert tok.decode(tok(text).input_ids) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"):
        assert tok(f"a{special}b").input_ids[1:2] == [tok.convert_tokens_to_ids(special)]


def test_chat_template_renders_chatml_without_double_bos(ours):
    tok = ours[0]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == text + "<|im_start|>assistant\n" and prompt.count("<|im_start|>") == len(chat) + 1
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == len(chat) + 1 and ids[0] == tok.bos_token_id != ids[1]
    assert tok(prompt).input_ids == ids  # the GGUF says add_bos_token=False: no second BOS added


def test_smollm2_is_a_noop_when_already_converted(smollm2_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert ensure_smollm2(smollm2_dir) == smollm2_dir
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    assert json.loads((smollm2_dir / MARKER).read_text())["source_sha256"] == file_sha256(smollm2_gguf_path())


# ---- a tiny random Llama through GGUF and back

TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
TINY_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def tiny_llama(tie: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256 + len(TINY_MERGES) + len(TINY_SPECIAL), hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                                   rope_theta=5000.0, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def write_tiny_gguf(path: Path, model, arch: str = "llama", pre: str = "llama-bpe") -> Path:
    """What convert_hf_to_gguf writes for a Llama: F32 tensors, q/k rows permuted, Llama-3-style vocab."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    tokens = list(bytes_to_unicode().values()) + ["".join(m) for m in TINY_MERGES] + TINY_SPECIAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges([" ".join(m) for m in TINY_MERGES])
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_eot_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>"
                        "{% endfor %}")
    to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for name, t in state.items():
        if name.endswith("q_proj.weight"):
            t = llamacpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llamacpp_permute(t, cfg.num_key_value_heads)
        if name in to_gguf:
            gname = to_gguf[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(gname, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_round_trip_gives_identical_logits(tmp_path, tie):
    model = tiny_llama(tie)
    out = convert(write_tiny_gguf(tmp_path / "tiny.gguf", model), tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.tie_word_embeddings == tie and back.config.num_key_value_heads == 2
    for name, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], w), name
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_tiny_bfloat16_and_llama3_style_tokenizer(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=False))
    out = convert(path, tmp_path / "hf", dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    # eos and eot both stop, as llama.cpp does for Llama 3 (DESIGN.md: stop ids are a list)
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["the thin  cat 12345", "in the\n\nat", "é ü 東"]:
        assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
        assert tok(text).input_ids[0] == tok.bos_token_id  # the GGUF asks for BOS
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.convert_ids_to_tokens(tok(" the", add_special_tokens=False).input_ids) == ["Ġthe"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1  # the template writes BOS; tokenising it adds none


def test_conversion_is_a_complete_marked_directory(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    out = convert(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    assert is_converted(out, file_sha256(path), "float32") and not is_converted(out, file_sha256(path), "bfloat16")
    with open(out / "tokenizer.json", "a") as f:  # a damaged file no longer counts as converted
        f.write(" ")
    assert not is_converted(out, file_sha256(path), "float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no temp dirs left behind


def test_refuses_to_overwrite_unless_forced(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        convert(path, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").exists()
    convert(path, tmp_path / "hf", force=True)
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert(tmp_path / "missing.gguf", tmp_path / "a")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(GGUFConversionError, match="not a GGUF file"):
        convert(tmp_path / "notes.gguf", tmp_path / "b")
    gpt2 = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_llama(tie=True), arch="gpt2")
    with pytest.raises(GGUFConversionError, match="general.architecture is 'gpt2'"):
        convert(gpt2, tmp_path / "c")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", tiny_llama(tie=True), pre="made-up")
    with pytest.raises(GGUFConversionError, match="tokenizer.ggml.pre = 'made-up'"):
        convert(odd, tmp_path / "d")
    with pytest.raises(GGUFConversionError, match="--dtype"):
        convert(gpt2, tmp_path / "e", dtype="float16")
    assert not any((tmp_path / n).exists() for n in "abcde")  # failures leave no output behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    capsys.readouterr()
    assert main([str(gpt2), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "general.architecture is 'gpt2'" in err
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "c")]) == 2
    assert "missing.gguf: no such GGUF file" in capsys.readouterr().err


def test_command_line(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    assert main([str(path), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main([str(path), str(tmp_path / "hf")]) == 2  # exists: needs --force
    assert main([str(path), str(tmp_path / "hf"), "--force"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(SystemExit):
        main(["--smollm2", str(path), str(tmp_path / "x")])  # --smollm2 takes OUT_DIR only
