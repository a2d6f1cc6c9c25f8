"""Checkpoints other tools read (issue 17, parts 1-2): an RM we write is pooled by transformers at
the token we trained on (its pad id never occurs in text, and config.json, tokenizer_config.json
and special_tokens_map.json agree on it), and a policy we write stops in transformers' generate()
at the end-of-turn token even when its source's generation_config.json does not list it."""

import json

import pytest
import torch

from conftest import VOCAB_SIZE, hf_model, make_tiny_checkpoint, make_tiny_tokenizer
from mt import chat
from mt.checkpoint import load_model, save_model
from mt.config import RMConfig
from mt.data import write_jsonl

QUESTIONS = ["What is two plus two?", "Write a short poem about the sea.", "Why is the sky blue?",
             "Hello world, how are you today?"]
ANSWERS = ["Two plus two is four.", "The sea is blue and wide.", "Blue light scatters most.",
           "Fine."]


def make_pairs():
    return [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}], "chosen": a,
             "rejected": "no"} for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def pad_entries(d):
    """The pad token as each file names it: (config id, tokenizer_config, special_tokens_map)."""
    def content(v):
        return v.get("content") if isinstance(v, dict) else v
    cfg = json.loads((d / "config.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    sm = json.loads((d / "special_tokens_map.json").read_text())
    return cfg["pad_token_id"], content(tc["pad_token"]), content(sm["pad_token"])


def check_pad_consistent(d, token, vocab_size):
    """config.json, tokenizer_config.json and special_tokens_map.json name one pad token, which
    transformers' tokenizer reads back, which has an embedding row, and which no chat contains."""
    from transformers import AutoTokenizer
    pad_id, tc_pad, sm_pad = pad_entries(d)
    assert tc_pad == sm_pad == token
    hf_tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert hf_tok.pad_token == token and hf_tok.pad_token_id == pad_id
    cfg = json.loads((d / "config.json").read_text())
    assert pad_id < cfg["vocab_size"] == vocab_size
    assert pad_id not in chat.stop_ids(chat.load_tokenizer(d), d)
    assert pad_id not in chat.chat_ids(chat.load_tokenizer(d))
    return pad_id


def test_trained_rm_scores_alike_in_transformers(tmp_path):
    """pad == eos in the base (a Llama-3-style tokenizer without a pad token): the RM train_rm.py
    writes gets an added <pad> (the vocabulary is full, so the embedding grows by a row), and a
    right-padded batch through AutoModelForSequenceClassification equals mt.scoring (fp32,
    1e-5)."""
    import train_rm
    from mt.scoring import score_conversations
    base = make_tiny_checkpoint(tmp_path / "base", "llama")  # llama3 style: no pad, config's = eos
    tok = chat.load_tokenizer(base)
    config = json.loads((base / "config.json").read_text())
    assert tok.pad_token_id == tok.eos_token_id == config["pad_token_id"]
    assert len(tok) == VOCAB_SIZE  # no free id: a new token needs a new embedding row
    pairs = make_pairs()
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = RMConfig(lr=1e-3, batch_size=2, micro_batch_size=2, max_length=128)
    train_rm.train(base, [tmp_path / "pairs.jsonl"], tmp_path / "rm", cfg)
    final = tmp_path / "rm" / "final"
    pad_id = check_pad_consistent(final, "<pad>", VOCAB_SIZE + 1)
    assert pad_id == VOCAB_SIZE

    items = [(p["prompt"], y) for p in pairs for y in (p["chosen"], p["rejected"])]
    ours = score_conversations(final, items, device="cpu", dtype="fp32", progress=False)
    ours = torch.tensor(ours)
    # what RewardBench's run_rm.py / TRL do: the saved tokenizer pads the batch, the model pools
    ours_tok = chat.load_tokenizer(final)
    hf_tok_texts = [chat.render(ours_tok, m + [{"role": "assistant", "content": y}], False)
                    for m, y in items]
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    hf_tok.padding_side = "right"
    batch = hf_tok(hf_tok_texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert (batch["input_ids"][:, -1] == pad_id).any()  # the batch really is padded
    lengths = batch["attention_mask"].sum(-1)
    last = batch["input_ids"][torch.arange(len(items)), lengths - 1]
    assert (last == tok.eos_token_id).all()  # every chat ends in eos: where pad == eos went wrong
    hf = hf_model(final, "score")
    with torch.no_grad():
        ref = hf(**batch).logits[:, 0]
        # the pitfall the new pad removes: pad == eos pools one token early
        hf.config.pad_token_id = tok.eos_token_id
        eos_padded = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tok.eos_token_id)
        wrong = hf(input_ids=eos_padded, attention_mask=batch["attention_mask"]).logits[:, 0]
    assert (ours - ref).abs().max() <= 1e-5
    assert (wrong - ref).abs().max() > 1e-3


def _with_specials(d, tokens, legacy=False):
    """Add special tokens to the tokenizer in d (as a vocabulary's reserved tokens); legacy=True
    also writes the transformers-4 layout (added_tokens_decoder, a special_tokens_map.json of
    dicts)."""
    from transformers import AddedToken, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    added = [AddedToken(t, special=True, normalized=False) for t in tokens]
    tok.add_tokens(added, special_tokens=True)
    tok.save_pretrained(str(d))
    if legacy:
        tj = json.loads((d / "tokenizer.json").read_text())
        tc = json.loads((d / "tokenizer_config.json").read_text())
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        tc["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys}
                                      for t in tj["added_tokens"]}
        (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        sm = {k: {"content": tc[k], **entry} for k in ("bos_token", "eos_token")}
        (d / "special_tokens_map.json").write_text(json.dumps(sm, indent=2))
    return d


@pytest.mark.parametrize("legacy", [False, True])
@torch.no_grad()
def test_rm_pad_is_a_reserved_token_where_the_vocabulary_has_one(tmp_path, legacy):
    """Reserved special tokens with room in the embedding: the highest-numbered one becomes the pad
    (no new row); a vocabulary pad token (Llama-3.1's <|finetune_right_pad_id|>) is preferred."""
    src = make_tiny_checkpoint(tmp_path / "rm", "llama", "score")
    make_tiny_tokenizer(src, "llama3", vocab_size=VOCAB_SIZE - 10)  # room for tokens of our own
    reserved = [f"<|reserved_special_token_{i}|>" for i in (0, 1, 2)]
    _with_specials(src, reserved, legacy)
    with pytest.warns(UserWarning, match=r"pad_token_id == eos_token_id \(4\).*one token early"):
        model = load_model(src)  # a loaded RM whose config has pad == eos is named
    out = save_model(model, tmp_path / "saved", tokenizer_dir=src)
    pad_id = check_pad_consistent(out, reserved[2], VOCAB_SIZE)
    assert pad_id == chat.load_tokenizer(src).convert_tokens_to_ids(reserved[2])
    if legacy:  # both layouts of transformers 4 say the same
        tc = json.loads((out / "tokenizer_config.json").read_text())
        assert tc["added_tokens_decoder"][str(pad_id)]["content"] == reserved[2]
        sm = json.loads((out / "special_tokens_map.json").read_text())
        assert sm["pad_token"]["content"] == reserved[2]
    # our saved RM loads without the warning, and saving it again changes nothing
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = save_model(load_model(out), tmp_path / "again", tokenizer_dir=out)
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in names:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # a vocabulary pad token wins over reserved ones
    _with_specials(src, ["<|finetune_right_pad_id|>"])
    tok = chat.load_tokenizer(src)
    ft = "<|finetune_right_pad_id|>"
    assert chat.rm_pad_token(tok, VOCAB_SIZE) == chat.PadChoice(
        ft, tok.convert_tokens_to_ids(ft), "reserved")
    # ... but only with a row in the embedding; and a tokenizer's own safe pad is kept (ChatML)
    assert chat.rm_pad_token(tok, VOCAB_SIZE - 10).how == "added"
    chatml = chat.load_tokenizer(make_tiny_tokenizer(tmp_path / "chatml", "chatml"))
    kept = chat.PadChoice("<|endoftext|>", chatml.pad_token_id, "kept")
    assert chat.rm_pad_token(chatml, VOCAB_SIZE) == kept
    # ... unless config.json says it is eos (Qwen2 base: pad == eos == <|endoftext|>)
    assert chat.rm_pad_token(chatml, VOCAB_SIZE, avoid=[chatml.pad_token_id]).how == "added"


# ---- part 2: every policy checkpoint stops at the end of a turn


def _llama3_base_style(tmp_path):
    """A policy whose tokenizer eos and generation_config.json name <|end_of_text|> only, while
    its chat template ends a turn with <|eot_id|> (Llama-3-8B-Instruct as first released:
    vllm#4180)."""
    src = make_tiny_checkpoint(tmp_path / "src", "llama")
    make_tiny_tokenizer(src, "llama3", eos_token="<|end_of_text|>")
    tok = chat.load_tokenizer(src)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    eos = tok.convert_tokens_to_ids("<|end_of_text|>")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": eos, "do_sample": False}
    (src / "generation_config.json").write_text(json.dumps(gen))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    return src, eot, eos


@torch.no_grad()
def test_policy_checkpoint_stops_at_end_of_turn_in_generate(tmp_path):
    from transformers import AutoModelForCausalLM
    src, eot, eos = _llama3_base_style(tmp_path)
    out = save_model(load_model(src), tmp_path / "policy", tokenizer_dir=src)
    gen = json.loads((out / "generation_config.json").read_text())
    tok = chat.load_tokenizer(out)
    assert gen["eos_token_id"] == chat.stop_ids(tok, out) == sorted({eot, eos})
    assert gen["do_sample"] is False and gen["bos_token_id"] == tok.bos_token_id  # the rest: kept
    prompt = torch.tensor([chat.encode_prompt(tok, [{"role": "user", "content": "Hello world"}])])
    n = prompt.shape[1]

    def force_eot_third(batch_id, ids):  # any token but a stop id, then <|eot_id|> from the 3rd on
        if len(ids) - n >= 2:
            return [eot]
        return [i for i in range(VOCAB_SIZE) if i not in (eot, eos)]

    def generate(d):
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                              do_sample=False, prefix_allowed_tokens_fn=force_eot_third,
                              pad_token_id=tok.pad_token_id)[0, n:].tolist()

    ours = generate(out)
    assert len(ours) == 3 and ours[-1] == eot  # stopped at the end of the turn
    assert generate(src) == ours[:2] + [eot] * 8  # the source's own file never stops there
    # saving our checkpoint again leaves the file as it is (nothing missing from the stop list)
    again = save_model(load_model(out), tmp_path / "again", tokenizer_dir=out)
    name = "generation_config.json"
    assert (again / name).read_bytes() == (out / name).read_bytes()


def test_policy_checkpoint_without_generation_config_gets_one(tmp_path, tiny_llama_dir):
    src = tmp_path / "src"
    import shutil
    shutil.copytree(tiny_llama_dir, src)
    (src / "generation_config.json").unlink()
    tok = chat.load_tokenizer(src)
    out = save_model(load_model(src), tmp_path / "policy", tokenizer_dir=src)
    gen = json.loads((out / "generation_config.json").read_text())
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert gen == {"bos_token_id": tok.bos_token_id, "eos_token_id": [eot]}
    # and through the training loop: every ckpt-* and final carry it
    from mt import train as T
    from mt.config import DPOConfig
    from mt.losses import preference_objective
    import train_policy
    ex, _ = chat.policy_examples(tok, make_pairs(), 128)
    model = load_model(src)
    refs = train_policy.reference_logps(model, ex, 4, progress=False)
    cfg = DPOConfig(lr=1e-3, batch_size=2, micro_batch_size=2, save_every=1)
    res = T.train(model, ex, preference_objective("dpo"), cfg, tmp_path / "dpo", ref_logps=refs,
                  tokenizer_dir=src, progress=False)
    for d in res.checkpoints + [res.final]:
        assert json.loads((d / "generation_config.json").read_text()) == gen
