"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (Llama, ChatML, <|im_end|>).

Tiny random models cannot show what goes wrong with real tokenizers, templates, stop tokens and
trained weights; these tests run our model, sampler and one E-step on the real weights, with
`transformers` on the same directory as the reference.
"""
import json

import pytest
import torch
import transformers

import train_policy
from mt import chat
from mt.checkpoint import load_model, save_model
from mt.config import DPOConfig, SamplingConfig
from mt.data import pad_sequences, read_jsonl_rows, write_jsonl
from mt import sampler
from mt.sampler import sample
from mt.chat import policy_examples

QUESTIONS = ["What is the capital of France?", "What is 2 + 3? Answer with a number.",
             "Name a primary color."]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return chat.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    torch.manual_seed(0)
    return load_model(smollm2_dir, torch.float32).eval()


@pytest.fixture(scope="module")
def ref(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def msgs(q):
    return [{"role": "user", "content": q}]


def test_logits_equal_transformers_on_real_weights(ours, ref, tok):
    seqs = [chat.encode_prompt(tok, msgs(q)) for q in QUESTIONS]
    ids, lengths = pad_sequences(seqs, tok.pad_token_id, "right")
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        a = ours(ids)
        b = ref(input_ids=ids, attention_mask=mask).logits
    diff = ((a - b).abs() * mask[..., None]).max().item()
    assert diff <= 1e-4, diff


def test_template_stop_ids_and_no_double_bos(tok, smollm2_dir):
    ids = chat.encode_prompt(tok, msgs("hi"))
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # ChatML as SmolLM2 renders it (its template adds a default system turn): one <|im_start|> per turn
    # plus the generation prompt, and no BOS prepended on top of the template
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids.count(im_start) == text.count("<|im_start|>") and ids[0] == im_start
    if tok.bos_token_id is not None and tok.bos_token_id != im_start:
        assert ids.count(tok.bos_token_id) <= 1
    assert im_end in chat.stop_ids(tok, smollm2_dir)
    assert chat.end_of_turn_id(tok) == im_end


def test_greedy_answers_are_coherent_and_equal_generate(ours, ref, tok, smollm2_dir):
    cfg = sampler.SamplingConfig(greedy=True, max_new_tokens=24, slots=4)
    prompts = [{"prompt_id": f"q{i}", "prompt": msgs(q)} for i, q in enumerate(QUESTIONS)]
    rows = sample(ours, tok, prompts, cfg, n=1, stop_ids=chat.stop_ids(tok, smollm2_dir), return_logps=True)
    france = rows[0]
    assert "paris" in france["responses"][0].lower(), france["responses"][0]
    assert france["finish_reasons"] == ["stop"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for q, row in zip(QUESTIONS, rows):
        x = chat.encode_prompt(tok, msgs(q))
        out = ref.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                           do_sample=False, max_new_tokens=24, eos_token_id=chat.stop_ids(tok, smollm2_dir),
                           pad_token_id=tok.pad_token_id)
        theirs = out[0, len(x):].tolist()
        mine = row["token_ids"][0]
        assert mine == theirs[:len(mine)] and len(mine) == len(theirs), (q, tok.decode(mine), tok.decode(theirs))
        if row["finish_reasons"][0] == "stop":
            assert mine[-1] in chat.stop_ids(tok, smollm2_dir) and "<|im_end|>" not in row["responses"][0]
        else:  # truncated: marked, and never given an end token it did not produce
            assert len(mine) == 24 and mine[-1] != im_end


def test_one_e_step_on_real_weights(smollm2_dir, tok, tmp_path):
    """Samples, RM scores, pairs, reference log-probs, a DPO step and a checkpoint that loads in transformers."""
    # r0: SmolLM2's backbone with a fresh score head, saved as a sequence-classification directory
    torch.manual_seed(0)
    rm = load_model(smollm2_dir, torch.float32, head="score")
    rm_dir = save_model(rm, tmp_path / "rm", tokenizer_dir=smollm2_dir)
    del rm
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    it = tmp_path / "iter1"
    scfg = SamplingConfig(max_new_tokens=16, slots=8)
    train_policy.sample(smollm2_dir, prompts, it / "samples.jsonl", scfg, n=3, seed=0, stream="iter1/e-step")
    samples = read_jsonl_rows(it / "samples.jsonl")
    for s in samples:  # every truncated response is marked and is exactly at the cap
        for text, why, n in zip(s["responses"], s["finish_reasons"], s["num_tokens"]):
            assert why in ("stop", "length") and (why == "stop" or n == 16)
            assert "<|im_end|>" not in text and "<|im_start|>" not in text
    train_policy.score(rm_dir, it / "samples.jsonl", it / "scores.jsonl")
    scores = read_jsonl_rows(it / "scores.jsonl")
    assert all(len(s["scores"]) == 3 for s in scores)
    train_policy.pairs(it / "samples.jsonl", it / "scores.jsonl", it / "pairs.jsonl", keep_truncated=True)
    pairs = read_jsonl_rows(it / "pairs.jsonl")
    assert pairs, "three prompts with three samples each must give at least one pair"

    # response boundaries: prompt ids exactly as the sampler saw them, then the response, then <|im_end|>
    from mt.data import read_pairs
    examples, dropped = policy_examples(tok, read_pairs(it / "pairs.jsonl"), max_length=512)
    assert dropped == 0
    for p, e in zip(pairs, examples):
        assert list(e.chosen[:e.chosen_start]) == chat.encode_prompt(tok, p["prompt"])
        assert tok.decode(e.chosen[e.chosen_start:]) == p["chosen"] + "<|im_end|>"
        assert tok.decode(e.rejected[e.rejected_start:]) == p["rejected"] + "<|im_end|>"

    dcfg = DPOConfig(batch_size=len(pairs), micro_batch_size=1, lr=1e-5, max_length=512, save_every=0,
                     warmup_ratio=0.0, beta=0.1)
    train_policy.ref_logps(smollm2_dir, it / "pairs.jsonl", it / "ref_logps.jsonl",
                           **train_policy.reference_args(dcfg))
    refs = read_jsonl_rows(it / "ref_logps.jsonl")
    # the stored reference log-probs equal transformers' on the same sequences
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    by_key = {r["pair_id"]: r for r in refs}
    for e in examples:
        with torch.no_grad():
            lp = hf(torch.tensor([e.chosen])).logits.log_softmax(-1)[0]
        want = sum(lp[t - 1, e.chosen[t]].item() for t in range(e.chosen_start, len(e.chosen)))
        assert by_key[e.key]["ref_chosen_logps"] == pytest.approx(want, abs=2e-3)
    train_policy.dpo(smollm2_dir, it / "pairs.jsonl", it / "ref_logps.jsonl", it / "policy", dcfg)
    final = it / "policy" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    trained = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours_t = load_model(final, torch.float32).eval()
    x = torch.tensor([examples[0].chosen])
    with torch.no_grad():
        a, b, before = ours_t(x), trained(x).logits, hf(x).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (b - before).abs().max().item() > 1e-4  # the DPO step changed the weights
    assert chat.load_tokenizer(final).chat_template == tok.chat_template
