"""The decode loop of mt/sampler.py reads nothing from the device between harvests (STYLE.md 8, gpt-fast):
the top-p / top-k tier check is folded into the harvest, and the tokens stay the exact rule's."""
from dataclasses import replace

import pytest
import torch

from mt import sampler
from mt.model import PagedKVCache
from mt.sampler import SamplingConfig, generate
from mt.token_rule import next_token
from tests.test_sampler import ragged_prompts, tiny


@pytest.fixture
def no_reads_in_step(monkeypatch):
    """Fail on any host read of a tensor (tolist, item, bool, int, float) inside _Engine.step; count the
    redraws (next_token calls, which read the device, at harvests)."""
    inside, count = [False], {"redraws": 0, "steps": 0}

    def guard(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            assert not inside[0], f"Tensor.{name} inside a decode step: a host sync"
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        guard(name)
    step, redraw = sampler._Engine.step, sampler._Engine.redraw

    def spied_step(self, *a):
        inside[0] = True
        count["steps"] += 1
        try:
            return step(self, *a)
        finally:
            inside[0] = False

    def spied_redraw(self, *a):
        count["redraws"] += 1
        return redraw(self, *a)
    monkeypatch.setattr(sampler._Engine, "step", spied_step)
    monkeypatch.setattr(sampler._Engine, "redraw", spied_redraw)
    return count


@pytest.mark.parametrize("rule", [dict(top_p=0.9, top_k=0), dict(top_p=1.0, top_k=70), dict(top_p=0.8, top_k=100)])
def test_decode_steps_do_not_sync_and_draw_what_the_exact_rule_draws(no_reads_in_step, monkeypatch, rule):
    _, model = tiny("llama")
    prompts = ragged_prompts()
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, slots=5, check_every=4, **rule)
    stop = [3, 4, 5, 6, 7, 8]
    got = generate(model, prompts, cfg, stop_ids=stop, n=3, return_logps=True)
    assert no_reads_in_step["steps"] > 0
    if not rule["top_k"]:  # a flat random model: top-p sets outgrow the first 64 candidates (top-k misses on ties)
        assert no_reads_in_step["redraws"] > 0, "the run exercises the redraw"
    monkeypatch.undo()  # the reference: the exact rule inside every step (the loop before this change)
    monkeypatch.setattr(sampler, "draft_token", lambda logits, keys, step, c: (next_token(logits, keys, step, c), None))
    ref = generate(model, prompts, replace(cfg, check_every=1), stop_ids=stop, n=3, return_logps=True)
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in ref]
    for cs, rs in zip(got, ref):
        for c, r in zip(cs, rs):
            assert c.finish_reason == r.finish_reason
            assert torch.allclose(torch.tensor(c.logps), torch.tensor(r.logps), atol=1e-6, rtol=0)



def test_paged_decode_steps_through_flex_attention_do_not_sync(no_reads_in_step, monkeypatch):
    """The GPU path of the paged cache: blocks are taken on the host before the steps (grow), and the
    block mask is built on the device, so a step reads nothing back (the CPU's gathered read does: a
    host read is free there)."""
    monkeypatch.setattr(PagedKVCache, "use_flex", True)
    monkeypatch.setattr(sampler, "PAGE", 8)
    _, model = tiny("llama")
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=10, slots=3, check_every=4,
                         kv_cache="paged", kv_blocks=8)
    got = generate(model, ragged_prompts((5, 1, 9, 12)), cfg, stop_ids=[3, 4], n=2)
    assert no_reads_in_step["steps"] > 0 and all(c.num_tokens for cs in got for c in cs)
