"""Tests for mt/sampler.py against references: transformers' generate() (greedy, token for token), an
uncached full forward (log-probs), and itself across slot counts, check intervals, refill grouping, a shared
prompt prefix, prompt order and world sizes (the one-process file vs torchrun with 2 gloo
ranks)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mt import sampler
from mt.errors import UserError
from mt.model import ModelConfig, Transformer
from mt.sampler import SamplingConfig, generate, sample
from mt.token_rule import stream_key

REPO = Path(__file__).resolve().parents[1]
V = 128


def tiny(kind: str = "llama", seed: int = 0):
    """A random transformers model and ours with the same weights (fp32, eval)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                  pad_token_id=0)
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**common, initializer_range=0.1))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common, initializer_range=0.1, use_sliding_window=False,
                                          tie_word_embeddings=True))
    hf.eval()
    ours = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=False)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    return hf, ours.eval()


def ragged_prompts(lengths=(5, 1, 9, 3, 12, 2, 7), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (L,), generator=g).tolist() for L in lengths]


def hf_greedy(hf, prompts, max_new, eos=None) -> list[list[int]]:
    """transformers generate(), left-padded with a mask; each row cut after its first stop id."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):], mask[r, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                          pad_token_id=0)[:, T:].tolist()
    cut = []
    for row in out:
        stops = [k for k, t in enumerate(row) if eos and t in eos]
        cut.append(row[: stops[0] + 1] if stops else row)
    return cut


# ---- greedy parity with transformers


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(kind):
    hf, ours = tiny(kind)
    prompts, max_new = ragged_prompts(), 16
    free = hf_greedy(hf, prompts, max_new)
    # two stop ids, each the greedy token of some row mid-way, so both end rows and others run to the cap
    stops = sorted({free[0][4], free[2][7]})
    want = hf_greedy(hf, prompts, max_new, eos=stops)
    cfg = SamplingConfig(greedy=True, max_new_tokens=max_new, slots=3)  # fewer slots than jobs: refills
    got = generate(ours, prompts, cfg, stop_ids=stops, n=2)  # n=2: the prefix copy to sibling slots
    for i, w in enumerate(want):
        for c in got[i]:
            assert c.token_ids == w, f"prompt {i}"
            assert c.finish_reason == ("stop" if w[-1] in stops else "length")
    reasons = [c.finish_reason for cs in got for c in cs]
    assert "stop" in reasons and "length" in reasons
    ended_by = {cs[0].token_ids[-1] for cs in got if cs[0].finish_reason == "stop"}
    assert ended_by == set(stops), "every stop id ends some row"


def _engines(monkeypatch) -> list:
    """Every sampling pass's engine from now on, to look at after the pass."""
    engines, run = [], sampler._Engine.run
    monkeypatch.setattr(sampler._Engine, "run", lambda e, bar: engines.append(e) or run(e, bar))
    return engines


def test_shared_prompt_prefix_is_prefilled_once_and_changes_nothing(monkeypatch):
    hf, ours = tiny("llama")
    system = ragged_prompts((6,), seed=5)[0]  # a chat template's system turn, say
    prompts = [system + p for p in ragged_prompts((5, 1, 9, 3))] + [system + [7]]
    max_new = 12
    want = hf_greedy(hf, prompts, max_new)
    engines = _engines(monkeypatch)
    greedy = SamplingConfig(greedy=True, max_new_tokens=max_new, slots=2)
    got = generate(ours, prompts, greedy, n=2)
    assert [[c.token_ids for c in cs] for cs in got] == [[w, w] for w in want]
    assert engines[-1].shared == len(system), "the common prefix, not a whole prompt's prefix"
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=max_new, slots=3)
    ref = generate(ours, prompts, cfg, stop_ids=[3, 4, 5], n=2)
    monkeypatch.setattr(sampler, "SHARE_PREFIX", False)
    assert generate(ours, prompts, cfg, stop_ids=[3, 4, 5], n=2) == ref
    assert engines[-1].shared == 0


# ---- cached log-probs vs an uncached forward


def test_logps_match_uncached_forward():
    _, model = tiny("llama")
    prompts = ragged_prompts()
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=20, slots=4)
    got = generate(model, prompts, cfg, stop_ids=[3, 4, 5], n=3, return_logps=True)
    for p, comps in zip(prompts, got):
        for c in comps:
            seq = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                logits = model(seq)[0, len(p) - 1: -1]  # (T_new, V) the logits that produced each token
            ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(c.logps), ref, atol=1e-5, rtol=0), (p, c)


# ---- torch.compile of the decode step (opt-in, for the GPU; compiles in about 40 s here)


def test_compiled_decode_step_equals_eager():
    _, model = tiny("llama")
    prompts = ragged_prompts()
    # 3 slots for 14 jobs: refills and the tail's compaction change the decode batch, the window grows
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=70, slots=3)
    ref = generate(model, prompts, cfg, stop_ids=[3, 4, 5], n=2, return_logps=True)
    from torch._dynamo.utils import counters
    shapes, graphs = [], counters["stats"]["unique_graphs"]
    step = sampler._Engine.step
    with pytest.MonkeyPatch.context() as mp:  # the (rows, window) of every decode step
        mp.setattr(sampler._Engine, "step",
                   lambda self, w: shapes.append((self.m, w)) or step(self, w))
        got = generate(model, prompts, replace(cfg, compile=True), stop_ids=[3, 4, 5], n=2,
                       return_logps=True)
    # static shapes: one graph per bucket met, rows 3 (the slots) or 1 (the tail), windows 64 x 2^i
    assert counters["stats"]["unique_graphs"] - graphs == len(set(shapes)), "one graph per shape"
    assert {m for m, _ in shapes} == {3, 1} and {w for _, w in shapes} == {64, 128}
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in ref]
    for cs, rs in zip(got, ref):
        for c, r in zip(cs, rs):
            assert torch.allclose(torch.tensor(c.logps), torch.tensor(r.logps), atol=1e-5, rtol=0)
    assert max(len(p) + c.num_tokens for p, cs in zip(prompts, ref) for c in cs) > sampler.WINDOW, "window grew"
    # another model object of the same shape (as model selection loads one checkpoint after another), here
    # with the same weights so the pass meets the same sizes: no new compile, and no compiled wrapper keeps
    # the first model alive
    import gc
    import weakref

    graphs = counters["stats"]["unique_graphs"]
    _, other = tiny("llama")
    assert generate(other, prompts, replace(cfg, compile=True), stop_ids=[3, 4, 5], n=2, return_logps=True) == got
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a second model of the same shape"
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None, "the compiled decode step leaked the model"


# ---- invariance: slot count, check interval, prompt order, randomness


def test_same_results_for_any_slot_count_check_interval_and_prefill_chunk(monkeypatch):
    _, model = tiny("llama")
    prompts = ragged_prompts()
    base = SamplingConfig(temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=12, check_every=1)
    stop = [3, 4, 5, 6, 7, 8]
    ref = generate(model, prompts, replace(base, slots=1), stop_ids=stop, n=3)
    for slots, every in [(2, 1), (5, 3), (64, 1), (7, 8)]:
        got = generate(model, prompts, replace(base, slots=slots, check_every=every), stop_ids=stop, n=3)
        assert got == ref, (slots, every)
    monkeypatch.setattr(sampler, "PREFILL_TOKENS", 12)  # several prefill forwards per refill
    assert generate(model, prompts, replace(base, slots=64), stop_ids=stop, n=3) == ref
    reasons = {c.finish_reason for cs in ref for c in cs}
    assert reasons == {"stop", "length"}, "the run exercises refills after early stops"
    samples = [tuple(c.token_ids) for c in ref[4]]
    assert len(set(samples)) == 3, "the samples of a prompt draw different streams"


def test_grouped_refill_runs_fewer_prefills_and_changes_nothing(monkeypatch):
    _, model = tiny("llama")
    prompts = ragged_prompts(tuple(range(2, 26)), seed=2)  # 24 prompts, one response each
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, slots=8)  # groups of 2
    stop = [3, 4, 5, 6, 7, 8]
    engines = _engines(monkeypatch)
    grouped = generate(model, prompts, cfg, stop_ids=stop)
    monkeypatch.setattr(sampler, "REFILL_GROUP", 0)  # refill as soon as a slot is free
    monkeypatch.setattr(sampler, "REFILL_WAIT", 0)
    assert generate(model, prompts, cfg, stop_ids=stop) == grouped
    assert generate(model, prompts, replace(cfg, slots=1), stop_ids=stop) == grouped
    assert engines[0].prefills < engines[1].prefills, "grouped refills run fewer prefill forwards"


def test_same_results_for_any_prompt_order_and_batch():
    _, model = tiny("qwen2")
    prompts = ragged_prompts()
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=10, slots=4)
    keys = [[stream_key(7, "iter1/policy", f"p{i}", j) for j in range(2)] for i in range(len(prompts))]
    ref = generate(model, prompts, cfg, keys, stop_ids=[3], n=2)
    perm = [4, 0, 6, 2, 1, 5, 3]
    got = generate(model, [prompts[i] for i in perm], cfg, [keys[i] for i in perm], stop_ids=[3], n=2)
    assert [ref[i] for i in perm] == got
    alone = generate(model, prompts[2:3], replace(cfg, slots=1), keys[2:3], stop_ids=[3], n=2)
    assert alone[0] == ref[2]
    other = [[stream_key(7, "iter2/policy", f"p{i}", j) for j in range(2)] for i in range(len(prompts))]
    assert generate(model, prompts, cfg, other, stop_ids=[3], n=2) != ref, "another stream, other samples"


# ---- stop ids and truncation


def test_truncated_responses_are_marked_and_never_get_a_stop_id():
    _, model = tiny("llama")
    prompts = ragged_prompts()
    stop = [3, 4, 5, 6, 7, 8, 9, 10]  # frequent enough that some rows stop inside 6 tokens
    got = generate(model, prompts, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=6, slots=3),
                   stop_ids=stop, n=4)
    comps = [c for cs in got for c in cs]
    for c in comps:
        inner = [t for t in c.token_ids[:-1] if t in stop]
        assert not inner, "generation ends at the first stop id"
        if c.finish_reason == "length":
            assert c.num_tokens == 6 and c.token_ids[-1] not in stop
        else:
            assert c.finish_reason == "stop" and c.token_ids[-1] in stop and c.num_tokens <= 6
    assert {c.finish_reason for c in comps} == {"stop", "length"}
    assert len({c.token_ids[-1] for c in comps if c.finish_reason == "stop"}) >= 2, "several stop ids end rows"
    nostop = generate(model, prompts, SamplingConfig(greedy=True, max_new_tokens=5, slots=2), stop_ids=[], n=1)
    assert all(cs[0].finish_reason == "length" and cs[0].num_tokens == 5 for cs in nostop)


# ---- text level and data-parallel, through the command line


def write_tiny_checkpoint(d: Path):
    """A tiny Llama directory with a word-level tokenizer and a chat template, as the CLI loads them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<|eot|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{k}" for k in range(V - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|eot|>", "<|user|>", "<|assistant|>"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|eot|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(d)
    hf, _ = tiny("llama", seed=3)
    hf.config.eos_token_id = [2, 3]
    hf.generation_config.eos_token_id = [2, 3]
    hf.save_pretrained(d)
    return tok


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_rows(a, b):
    """Identical rows, except log-probs: equal up to fp32 rounding (kernels differ with the batch shape)."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "logps"} for r in rows]
    assert strip(a) == strip(b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra["logps"], rb["logps"]):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_sample_rows_and_world_size_1_vs_2(tmp_path):
    from mt.chat import encode_prompt, load_tokenizer
    from mt.checkpoint import load_model
    from mt.data import read_prompts, read_samples
    tok = write_tiny_checkpoint(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(7):
            words = " ".join(f"w{(7 * i + k) % 100 + 6}" for k in range(1 + 3 * i % 8))
            f.write(json.dumps({"prompt_id": f"q{i}", "prompt": words}) + "\n")
    # --num-samples, not --n: torchrun's own parser rejects --n as an ambiguous prefix of its options
    args = ["--model", str(tmp_path / "m"), "--prompts", str(prompts), "--num-samples", "3",
            "--sampling.max_new_tokens", "12", "--sampling.temperature", "1.0", "--sampling.slots", "4",
            "--seed", "5", "--logps"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    subprocess.run([sys.executable, "-m", "mt.sampler", *args, "--out", str(one)], check=True, env=env, cwd=REPO)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "mt.sampler", *args, "--out", str(two)], check=True, env=env, cwd=REPO)
    assert_same_rows(read_rows(one), read_rows(two))
    assert [s["prompt_id"] for s in read_samples(one)] == [f"q{i}" for i in range(7)]
    assert not list(tmp_path.glob("two.jsonl.rank*")), "shards are merged and removed"

    # the same rows in process, and their texts are the decoded ids without the stop id
    model = load_model(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, slots=2)
    rows = sample(model, tok, read_prompts(prompts), cfg, seed=5, stream="sample", n=3, return_logps=True)
    assert_same_rows(read_rows(one), rows)
    for row, p in zip(rows, read_prompts(prompts)):
        assert encode_prompt(tok, p["prompt"])[0] == tok.bos_token_id
        for text, ids, why in zip(row["responses"], row["token_ids"], row["finish_reasons"]):
            assert (ids[-1] in (2, 3)) == (why == "stop")
            assert text == tok.decode(ids[:-1] if why == "stop" else ids, skip_special_tokens=True)
            assert "</s>" not in text and "<|eot|>" not in text
    # the user's error, not a bug: its file, the prompt, its length and the flag (mt/errors.py)
    with pytest.raises(UserError, match=r"^p.jsonl: prompt 'q0' is \d+ tokens under .*, over "
                                        r"--sampling.max_prompt_tokens=3\. Fix: raise"):
        sample(model, tok, read_prompts(prompts), replace(cfg, max_prompt_tokens=3), source="p.jsonl")


# ---- under FSDP2 (2 gloo ranks): one gather per pass, ranks decode independently, training resumes


def test_sampling_a_model_sharded_with_fsdp2():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "fsdp"], env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("fsdp ok") == 2


def _fsdp_worker():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from mt.sampler import gathered
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _, model = tiny("llama")
    prompts = ragged_prompts()[rank::2]  # 4 and 3 prompts: the ranks run different numbers of steps
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10 + 5 * rank, slots=3)
    ref = generate(model, prompts, cfg, stop_ids=[3, 4], n=2, return_logps=True)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    w = model.model.layers[0].mlp.up_proj
    model(torch.tensor([[1, 2, 3]])).sum().backward()  # a training step first: FSDP initialised, grads exist
    with gathered(model):
        assert not isinstance(w.weight, DTensor) and w.weight.shape == (128, 64), "gathered for the whole pass"
        got = generate(model, prompts, cfg, stop_ids=[3, 4], n=2, return_logps=True)
        assert not isinstance(w.weight, DTensor), "still gathered after every forward"
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in ref]
    assert isinstance(w.weight, DTensor) and w.weight.to_local().shape == (64, 64), "resharded afterwards"
    model.zero_grad()
    model(torch.tensor([[1, 2, 3]])).sum().backward()  # no inference tensors left behind (no_grad, not inference_mode)
    assert w.weight.grad is not None
    print("fsdp ok", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["fsdp"]:
    from mt import dist as mt_dist
    mt_dist.run(_fsdp_worker)  # the commands' own exit path (barrier, then no interpreter finalisation)
