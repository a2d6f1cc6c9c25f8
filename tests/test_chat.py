"""mt/chat.py on tiny offline tokenizers in both template styles: one BOS, the end-of-turn token, every stop id,
pad handling, RM scores when pad == eos (against transformers row by row), and clear errors."""

import json

import pytest
import torch

from conftest import VOCAB_SIZE, hf_model, make_tiny_tokenizer
from mt.chat import (ChatTemplateError, encode_conversation, encode_prompt, encode_response, end_of_turn_id,
                     load_tokenizer, stop_ids)
from mt.checkpoint import load_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("llama3"), "llama3")


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("chatml"), "chatml")


def test_llama3_prompt_has_exactly_one_bos(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    assert len(tok) <= VOCAB_SIZE and tok.chat_template is not None
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    ids = encode_prompt(tok, CHAT)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids).endswith("What is two plus two?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # the trap this guards against is real in this tokenizer: adding special tokens again doubles BOS
    naive = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))["input_ids"]
    assert naive[:2] == [bos, bos] and naive[1:] == ids
    conv = encode_conversation(tok, CHAT, "Four.")
    assert conv.count(bos) == 1 and conv[:len(ids)] == ids
    assert tok.decode(conv[len(ids):]) == "Four.<|eot_id|>"


def test_chatml_prompt_has_no_bos(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    assert tok.bos_token is None
    ids = encode_prompt(tok, CHAT)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is two plus two?"
                               "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("style, eot", [("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")])
def test_response_ends_with_end_of_turn(style, eot, llama3_dir, chatml_dir):
    tok = load_tokenizer(llama3_dir if style == "llama3" else chatml_dir)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert end_of_turn_id(tok) == eot_id
    ids = encode_response(tok, "Four, since 2 + 2 = 4.")
    assert ids[-1] == eot_id and eot_id not in ids[:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "Four, since 2 + 2 = 4."
    conv = encode_conversation(tok, CHAT, "Four.")
    assert eot_id in conv[-2:]  # ChatML writes a newline after <|im_end|>


def test_stop_ids_include_every_end_token(llama3_dir, chatml_dir, tmp_path):
    tok = load_tokenizer(llama3_dir)
    ids = stop_ids(tok)
    assert ids == sorted(ids) and all(type(i) is int for i in ids)
    assert {tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")} <= set(ids)
    tok = load_tokenizer(chatml_dir)
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")} <= set(stop_ids(tok))
    # Llama-3 base-style tokenizer (eos = <|end_of_text|>), no generation_config.json: the template's
    # end of turn still stops generation
    d = make_tiny_tokenizer(tmp_path / "base", "llama3", eos_token="<|end_of_text|>", generation_config=False)
    tok = load_tokenizer(d)
    assert not (d / "generation_config.json").exists()
    assert set(stop_ids(tok)) == {tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")}
    # generation_config.json of another directory (the model's, when the tokenizer lives elsewhere)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert 7 in stop_ids(tok, tmp_path / "model")


def test_pad_token(llama3_dir, chatml_dir):
    tok = load_tokenizer(llama3_dir)  # Llama-3 has no pad token: eos fills tensors
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    tok = load_tokenizer(chatml_dir)  # a pad token of its own is kept
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


@torch.no_grad()
def test_rm_scores_right_when_pad_is_eos(tiny_rm_dir):
    """pad == eos == <|eot_id|> and every conversation ends with it: ours (explicit lengths) equals
    transformers on each row alone, unpadded; transformers' own pad search on the batch gets it wrong."""
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_rm_dir)
    assert tok.pad_token_id == tok.eos_token_id
    convs = [encode_conversation(tok, [{"role": "user", "content": q}], a) for q, a in
             [("Hi", "Hello, how are you today?"), ("What is two plus two?", "Four."), ("Why blue?", "Light.")]]
    assert all(c[-1] == tok.eos_token_id for c in convs)
    lengths = torch.tensor([len(c) for c in convs])
    ids = torch.full((len(convs), int(lengths.max())), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, c in enumerate(convs):
        ids[b, :len(c)], mask[b, :len(c)] = torch.tensor(c), 1
    ours = load_model(tiny_rm_dir).rewards(ids, lengths=lengths)

    hf = hf_model(tiny_rm_dir, "score")
    hf.config.pad_token_id = None  # one unpadded row: transformers pools at its last token
    ref = torch.stack([hf(input_ids=torch.tensor([c])).logits[0, 0] for c in convs])
    assert (ours - ref).abs().max() <= 1e-5
    hf.config.pad_token_id = tok.pad_token_id
    pad_search = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (pad_search - ref).abs().max() > 1e-3  # the pitfall this guards against


def test_tokenizer_without_chat_template(tmp_path):
    d = make_tiny_tokenizer(tmp_path / "tok", "llama3", chat_template=False)
    with pytest.raises(ChatTemplateError) as e:
        load_tokenizer(d)
    assert str(e.value).startswith(f"{d}: the tokenizer has no chat template")


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ChatTemplateError, match=f"{tmp_path / 'nope'}: tokenizer directory does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ChatTemplateError, match=f"{tmp_path}: no tokenizer files"):
        load_tokenizer(tmp_path)
