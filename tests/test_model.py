"""mt/model.py against transformers on the same tiny random checkpoints: logits, RM scores, hidden states,
rope frequencies, ragged left/right padding, and the KV-cache path against a full forward."""

import copy
import dataclasses

import pytest
import torch

from conftest import hf_model, positions_from_mask, ragged_batch
from mt.checkpoint import load_model
from mt.model import ConfigError, KVCache, ModelConfig, rope_inv_freq

LM_FAMILIES = ["llama", "llama31", "llama_linear", "mistral", "qwen2"]
LENGTHS = [7, 12, 3, 10]
TOL = 1e-5  # fp32


def max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(ours, transformers) for a family/head, loaded once per module."""
    made = {}

    def get(family, head="lm"):
        if (family, head) not in made:
            d = tiny_checkpoint(family, head)
            made[family, head] = load_model(d), hf_model(d, head)
        return made[family, head]

    return get


# ---- full forward parity


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", LM_FAMILIES)
@torch.no_grad()
def test_logits_match_transformers(pair, family, side):
    torch.manual_seed(0)
    ours, hf = pair(family)
    ids, mask = ragged_batch(LENGTHS, side=side, seed=1)
    # transformers' plain forward counts positions from the first column; HF generate passes these instead
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    assert ref[mask.bool()].abs().mean() > 0.3  # logits of O(1): a 1e-5 tolerance means something
    assert max_diff(ours(ids, attention_mask=mask), ref, mask) <= TOL
    if side == "right":  # right padding needs no mask at all: real tokens never see the pads after them
        assert max_diff(ours(ids), ref, mask) <= TOL
    hidden = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state
    assert max_diff(ours(ids, attention_mask=mask, return_hidden=True), hidden, mask[..., None].expand_as(hidden)) <= TOL


@pytest.mark.parametrize("family", ["llama", "llama31", "llama_linear", "qwen2"])
def test_rope_frequencies_match_transformers(pair, family):
    ours, hf = pair(family)
    rot = hf.model.rotary_emb
    assert rot.attention_scaling == 1.0  # nothing else to apply for these rope types
    torch.testing.assert_close(ours.inv_freq, rot.inv_freq, rtol=0, atol=0)


@torch.no_grad()
def test_rope_scaling_is_exercised(pair):
    """Guard for the llama31 parity test: dropping the scaling must break it at our test lengths."""
    ours, hf = pair("llama31")
    ids, mask = ragged_batch(LENGTHS, side="right", seed=1)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    plain = copy.deepcopy(ours)
    plain.cfg = dataclasses.replace(ours.cfg, rope_scaling=None)
    plain.inv_freq = rope_inv_freq(plain.cfg)
    assert max_diff(plain(ids), ref, mask) > 1e-3
    assert max_diff(ours(ids), ref, mask) <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parameter_names_are_transformers_names(pair, family):
    for head in ("lm", "score"):
        ours, hf = pair(family, head)
        assert set(ours.state_dict()) == set(hf.state_dict())
        for k, v in hf.state_dict().items():
            assert ours.state_dict()[k].shape == v.shape, k


# ---- reward model scores


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_rm_scores_match_transformers(pair, side):
    torch.manual_seed(0)
    ours, hf = pair("llama", "score")
    pad = hf.config.pad_token_id
    ids, mask = ragged_batch(LENGTHS, side=side, pad_id=pad, seed=2)  # no real token equals pad here
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.squeeze(-1)  # (B,)
    assert ref.shape == (len(LENGTHS),) and ref.abs().mean() > 0.1
    assert (ours.rewards(ids, attention_mask=mask) - ref).abs().max() <= TOL
    if side == "right":
        assert (ours.rewards(ids, lengths=mask.sum(-1)) - ref).abs().max() <= TOL
    # per-token scores too (the pooled one is one of them)
    per_tok = hf.score(hf.model(input_ids=ids, attention_mask=mask,
                                position_ids=positions_from_mask(mask)).last_hidden_state).squeeze(-1)
    assert max_diff(ours(ids, attention_mask=mask), per_tok, mask) <= TOL


@torch.no_grad()
def test_rm_scores_ignore_pad_id(pair):
    """Pooling reads explicit lengths: a batch whose real tokens contain the pad id scores as if padded with 0."""
    ours, _ = pair("llama", "score")
    ids, mask = ragged_batch(LENGTHS, pad_id=0, seed=3)
    lengths = mask.sum(-1)
    ref = torch.stack([ours.rewards(ids[b:b + 1, :n], lengths=n[None]) for b, n in enumerate(lengths)]).squeeze(-1)
    ids_eos_pad = ids.clone()
    ids_eos_pad[~mask.bool()] = ids[0, 0]  # pad with a token that also occurs as a real token
    assert (ours.rewards(ids_eos_pad, lengths=lengths) - ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="lengths or an attention_mask"):
        ours.rewards(ids)


# ---- KV cache


def full_logits(model, seq):
    """Reference: one unpadded row, full causal forward, no cache."""
    return model(torch.tensor([seq]))[0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@torch.no_grad()
def test_cached_decoding_matches_full_forward(pair, family):
    """Ragged right-padded prompts prefilled into chosen slots of a dirty cache, then one token per step per
    slot at each row's own position; every step's logits equal a full forward over prompt + tokens so far."""
    torch.manual_seed(0)
    ours, _ = pair(family)
    lengths = [5, 9, 2]
    ids, mask = ragged_batch(lengths, seed=4)
    cache = KVCache(ours.cfg, n_slots=5, max_len=24, dtype=torch.float32)
    for t in (cache.k, cache.v):  # stale garbage everywhere: only masking keeps it out
        t.normal_(std=10.0)
    slots = torch.tensor([3, 0, 4])
    B, T = ids.shape
    logits = ours(ids, positions=torch.arange(T)[None].expand(B, T), cache=cache, slots=slots)
    seqs = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
    for b, seq in enumerate(seqs):
        assert (logits[b, :len(seq)] - full_logits(ours, seq)).abs().max() <= TOL
    g = torch.Generator().manual_seed(5)
    nxt = logits[torch.arange(B), torch.tensor(lengths) - 1].argmax(-1)  # (B,)
    for step in range(6):
        pos = torch.tensor([len(s) for s in seqs])[:, None]  # (B, 1): each slot at its own position
        for b in range(B):
            seqs[b].append(int(nxt[b]))
        step_logits = ours(nxt[:, None], positions=pos, cache=cache, slots=slots)[:, 0]  # (B, V)
        for b, seq in enumerate(seqs):
            assert (step_logits[b] - full_logits(ours, seq)[-1]).abs().max() <= TOL, (step, b)
        nxt = torch.randint(1, ours.cfg.vocab_size, (B,), generator=g)  # teacher-forced, any tokens will do

    # a finished slot is reused for a new, shorter prompt without clearing it
    new = [7, 8, 9]
    out = ours(torch.tensor([new]), positions=torch.arange(3)[None], cache=cache, slots=torch.tensor([0]))
    assert (out[0] - full_logits(ours, new)).abs().max() <= TOL
    step = ours(torch.tensor([[11]]), positions=torch.tensor([[3]]), cache=cache, slots=torch.tensor([0]))
    assert (step[0, -1] - full_logits(ours, new + [11])[-1]).abs().max() <= TOL


@torch.no_grad()
def test_cached_decoding_matches_transformers(pair):
    """Prefill then decode, all cache slots in order (slots=None), against transformers' full forward."""
    ours, hf = pair("llama31")
    ids, _ = ragged_batch([10, 10], seed=6)
    cache = KVCache(ours.cfg, n_slots=2, max_len=16, dtype=torch.float32)
    got = [ours(ids[:, :6], positions=torch.arange(6)[None].expand(2, 6), cache=cache)]
    for t in range(6, 10):
        got.append(ours(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    ref = hf(input_ids=ids).logits
    assert (torch.cat(got, 1) - ref).abs().max() <= TOL
    with pytest.raises(ValueError, match="explicit positions"):
        ours(ids[:, :1], cache=cache)


# ---- dtypes


def test_rope_frequencies_stay_fp32_in_bf16(pair):
    """Casting the model must not round the rope frequencies (angles at position 4000 would be off by radians)."""
    ours, _ = pair("llama31")
    m = copy.deepcopy(ours).to(torch.bfloat16)
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32
    torch.testing.assert_close(m.inv_freq, rope_inv_freq(ours.cfg), rtol=0, atol=0)
    assert m.to(torch.float32).inv_freq.dtype == torch.float32


# ---- config parsing


def test_from_hf_reads_both_transformers_spellings():
    """transformers 4.x writes rope_scaling + rope_theta, 5.x rope_parameters: same model either way."""
    base = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    v4 = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": rope})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {**rope, "rope_theta": 500000.0}})
    assert v4.rope_theta == v5.rope_theta == 500000.0
    torch.testing.assert_close(rope_inv_freq(v4), rope_inv_freq(v5), rtol=0, atol=0)
    old = ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope_scaling["rope_type"] == "linear"
    assert v4.head_dim == 16 and v4.rms_norm_eps == 1e-6 and v4.head == "lm"
    rm = ModelConfig.from_hf({**base, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1})
    assert rm.head == "score"
    # a causal LM config whose id2label lists two labels still becomes a 1-scalar reward model on request
    assert ModelConfig.from_hf({**base, "id2label": {"0": "A", "1": "B"}}, head="score").head == "score"


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; supported: llama, mistral, qwen2"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096 asks for sliding-window attention"),
    ({"architectures": ["LlamaForSequenceClassification"], "num_labels": 3}, "needs num_labels=1"),
    ({"architectures": ["LlamaForTokenClassification"]}, "LlamaForTokenClassification"),
])
def test_from_hf_rejects_what_we_cannot_run(change, fragment):
    base = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**base, **change}, source="/x/config.json")
    assert str(e.value).startswith("/x/config.json: ") and fragment in str(e.value)


def test_sliding_window_off_is_accepted():
    """Qwen2 configs carry a window with use_sliding_window=false; Mistral v0.2+ has sliding_window null."""
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096})
    ModelConfig.from_hf({**base, "model_type": "mistral", "sliding_window": None})
