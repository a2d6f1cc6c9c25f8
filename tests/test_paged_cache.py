"""The sampler's paged KV cache (mt/sampler.py _Pool): rows hold the blocks they use and read only their
own (and their prompt's shared prefix); a pool too small for every row makes rows wait or restart,
never fail, and the tokens are the same as with room for all."""
from dataclasses import replace

import pytest
import torch

from mt import sampler
from mt.model import ModelConfig
from mt.sampler import BLOCK, SamplingConfig, generate, pool_blocks
from tests.test_sampler import V, tiny

STOP = [3, 4, 5, 6, 7, 8]


def _prompts(lengths, prefix=(), seed=4):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(9, V, (L,), generator=g).tolist() for L in lengths]


@pytest.fixture
def engines(monkeypatch):
    """Every engine of the test, with the pool's invariants checked before every decode step: the blocks
    of rows of different prompts are disjoint but for the shared prefix's, every reference is held by a
    row, a prompt's prefix or the shared prefix, and a row's table is its block list."""
    made, step = [], sampler._Engine.step

    def checked(self, window):
        if not made or made[-1] is not self:
            made.append(self)
        R, pool = self.rows, self.pool
        live = [s for s in range(self.m) if R.slot_job[s] is not None]
        self.max_live = max(getattr(self, "max_live", 0), len(live))
        refs = [0] * len(pool.ref)
        for blocks in [R.blocks[s] for s in live] + list(self.prefix.values()) + [self.common]:
            for b in blocks:
                refs[b] += 1
        assert refs[1:] == pool.ref[1:], "every reference is held by a row, a prefix or the shared prefix"
        assert not set(pool.free) & {b for b, r in enumerate(refs) if r}, "a held block is free"
        common = set(self.common[: self.shared // BLOCK])
        for a in live:
            table = R.table[a].tolist()
            assert table[: len(R.blocks[a])] == R.blocks[a] and not any(table[len(R.blocks[a]):])
            assert len(R.blocks[a]) * BLOCK > R.pos_host[a], "a row's position lies in its blocks"
            for b in live:
                if a < b and R.slot_job[a][0] != R.slot_job[b][0]:
                    assert set(R.blocks[a]) & set(R.blocks[b]) <= common, "rows read only their own context"
        return step(self, window)
    monkeypatch.setattr(sampler._Engine, "step", checked)
    return made


@pytest.mark.parametrize("every", [1, 5])
def test_a_small_pool_preempts_and_gives_the_same_tokens(engines, every):
    _, model = tiny("llama")
    # prompt prefixes (all but the last token) ending inside, at and just past a block's end
    prompts = _prompts((70, 5, 130, 65, 66, 1, 129, 64))
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=70, slots=6, check_every=every)
    stop = [3, 4]  # responses of ~60 tokens, many at the cap: rows outgrow the small pool
    ref = generate(model, prompts, replace(cfg, slots=1), stop_ids=stop, n=3, return_logps=True)
    roomy = engines[-1]
    assert roomy.preempted == 0
    per_row = -(-roomy.max_len // BLOCK)
    for blocks in (2 * per_row + 3, 4 * per_row):
        got = generate(model, prompts, replace(cfg, kv_blocks=blocks), stop_ids=stop, n=3, return_logps=True)
        assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in ref], blocks
        for cs, rs in zip(got, ref):
            for c, r in zip(cs, rs):
                assert torch.allclose(torch.tensor(c.logps), torch.tensor(r.logps), atol=1e-5, rtol=0)
    small = engines[-2]
    assert small.preempted > 0 or small.max_live < cfg.slots, "in the smallest pool rows wait or restart"
    grew = [(len(p) - 1) // BLOCK != (len(p) + c.num_tokens - 2) // BLOCK for p, cs in zip(prompts, ref) for c in cs]
    assert any(grew) and not all(grew), "some rows take blocks while they decode, some do not"


def test_shared_prefixes_span_blocks_and_change_nothing(engines, monkeypatch):
    _, model = tiny("llama")
    system = _prompts((BLOCK + 7,), seed=5)[0]  # the shared prefix: a full block and a partial one
    prompts = _prompts((3, 60, 1, 70), prefix=system)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=20, slots=4)
    got = generate(model, prompts, cfg, stop_ids=STOP, n=2)
    assert engines[-1].shared == len(system)
    monkeypatch.setattr(sampler, "SHARE_PREFIX", False)
    assert generate(model, prompts, replace(cfg, slots=1), stop_ids=STOP, n=2) == got


def test_rows_hold_what_they_use_not_the_worst_case(engines, monkeypatch):
    """With most responses ending early (as real ones do), the blocks in use stay far below the
    dense cache's slots x (longest prompt + max_new_tokens)."""
    _, model = tiny("llama")
    peak, take = [0], sampler._Pool.take

    def counted(self, n):
        out = take(self, n)
        peak[0] = max(peak[0], len(self.ref) - 1 - len(self.free))
        return out
    monkeypatch.setattr(sampler._Pool, "take", counted)
    prompts = _prompts((20, 40, 10, 30) * 4)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=500, slots=16, check_every=4)
    out = generate(model, prompts, cfg, stop_ids=list(range(3, 30)), n=2)  # a stop id 1 token in ~4
    assert max(c.num_tokens for cs in out for c in cs) < 100
    e = engines[-1]
    dense = e.S * -(-e.max_len // BLOCK)
    assert peak[0] <= dense // 4, (peak[0], dense)


def test_paper_caps_fit_128_rows_of_an_8b_model_on_an_80_gb_gpu():
    """Llama-3-8B in bf16 (128 KiB of K and V per position) at the paper's caps, 2,048 prompt + 4,096 new
    tokens: the dense cache (0.75 GiB a slot) needs 96 GiB for 128 slots; the pool on an 80 GB H100 with
    the weights loaded holds 128 rows of 1,500 positions (a long chat prompt and response) twice over,
    or 76 rows at the full 6,144 at once."""
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    per_position = 2 * 32 * 8 * 128 * 2
    assert per_position * 6144 == 0.75 * 2 ** 30
    weights = 8.03e9 * 2
    free = int(79.1 * 2 ** 30 - weights - 2 ** 30)  # an H100's 79.1 GiB, less the weights and the context
    n = pool_blocks(cfg, 2, 128, 2048 + 4096, free_bytes=free)
    assert n * BLOCK * per_position <= free - sampler.HEADROOM
    assert n * BLOCK >= 2 * 128 * 1500 and n // -(-6144 // BLOCK) >= 76
    assert pool_blocks(cfg, 2, 128, 6144) * BLOCK * per_position > 96 * 2 ** 30, "the default without a GPU"
