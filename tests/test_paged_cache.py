"""The sampler's paged KV cache (mt/model.py PagedKVCache, the blocks handed out in mt/sampler.py):
rows hold the blocks they use and read only their own; a pool too small for every row makes rows
wait or restart, never fail; the tokens and log-probs are the dense cache's (float64, so equal means
equal). The CUDA path's FlexAttention runs here uncompiled, on a model forward and one short pass."""
from dataclasses import replace

import pytest
import torch

from mt import sampler
from mt.flags import ConfigError
from mt import model as M
from mt.model import KVCache, ModelConfig, PagedKVCache
from mt.sampler import SamplingConfig, generate, pool_blocks
from tests.test_sampler import V, tiny

PAGE = 16  # small blocks, so short test rows span several


def _prompts(lengths, prefix=(), seed=4):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(9, V, (L,), generator=g).tolist() for L in lengths]


def _model():
    return tiny("llama")[1].double()


def _same(got, ref):
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in ref]
    for cs, rs in zip(got, ref):
        for c, r in zip(cs, rs):
            if r.logps is not None:
                assert torch.allclose(torch.tensor(c.logps, dtype=torch.float64),
                                      torch.tensor(r.logps, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.fixture
def engines(monkeypatch):
    """Every paged engine of the test, its blocks checked before every decode step: live rows'
    blocks are disjoint (a row reads only its own context), every block is a live row's or free,
    never both, a row's table is its block list then scratch, and its position lies in its blocks."""
    monkeypatch.setattr(sampler, "PAGE", PAGE)
    made, step = [], sampler._Engine.step

    def checked(self, window):
        if not made or made[-1] is not self:
            made.append(self)
        if self.paged:
            R = self.rows
            live = [s for s in range(self.m) if R.slot_job[s] is not None]
            self.max_live = max(getattr(self, "max_live", 0), len(live))
            held = [b for s in live for b in R.blocks[s]]
            assert len(held) == len(set(held)), "a block is in two rows"
            assert sorted(held + self.free_blocks) == list(range(1, self.cache.n_blocks))
            for s in range(self.m):
                table = R.table[s].tolist()
                n = len(R.blocks[s])
                assert table[:n] == R.blocks[s] and not any(table[n:])
                if s in live:
                    assert n * PAGE > R.pos_host[s], "a row's position lies in its blocks"
        return step(self, window)
    monkeypatch.setattr(sampler._Engine, "step", checked)
    return made


@pytest.mark.parametrize("every", [1, 5])
def test_a_small_pool_preempts_and_gives_the_same_tokens(engines, every):
    model = _model()
    # prompt prefixes (all but the last token) ending inside, at and just past a block's end
    prompts = _prompts((20, 5, 33, 17, 18, 1, 32, 16))
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=40, slots=6, check_every=every,
                         kv_cache="dense")
    stop = [3, 4]  # responses of ~30 tokens, many at the cap: rows outgrow the small pool
    ref = generate(model, prompts, cfg, stop_ids=stop, n=2, return_logps=True)  # the dense cache
    per_row = -(-engines[-1].max_len // PAGE)
    roomy = generate(model, prompts, replace(cfg, kv_cache="paged"), stop_ids=stop, n=2, return_logps=True)
    _same(roomy, ref)
    assert engines[-1].preempted == 0
    for blocks in (per_row + 1, 2 * per_row + 3):
        got = generate(model, prompts, replace(cfg, kv_cache="paged", kv_blocks=blocks), stop_ids=stop, n=2,
                       return_logps=True)
        _same(got, ref)
        assert engines[-1].preempted > 0, f"{blocks} blocks: rows restart"
    assert engines[-2].max_live < cfg.slots, "in the smallest pool fewer rows run than there are slots"
    grew = [(len(p) - 1) // PAGE != (len(p) + c.num_tokens - 2) // PAGE for p, cs in zip(prompts, ref) for c in cs]
    assert any(grew) and not all(grew), "some rows take blocks while they decode, some do not"


def test_shared_prefixes_span_blocks_and_change_nothing(engines, monkeypatch):
    model = _model()
    system = _prompts((PAGE + 7,), seed=5)[0]  # the shared prefix: a full block and a partial one
    prompts = _prompts((3, 20, 1, 25), prefix=system)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=20, slots=3, kv_cache="paged")
    got = generate(model, prompts, cfg, stop_ids=[3, 4, 5], n=2, return_logps=True)
    assert engines[-1].shared == len(system)
    monkeypatch.setattr(sampler, "SHARE_PREFIX", False)
    _same(got, generate(model, prompts, replace(cfg, slots=1, kv_cache="dense"), stop_ids=[3, 4, 5], n=2,
                        return_logps=True))


def test_rows_hold_what_they_use_not_the_worst_case(engines):
    """With most responses ending early (as real ones do), the blocks in use stay far below the
    dense cache's slots x (longest prompt + max_new_tokens)."""
    model = _model()
    prompts = _prompts((20, 40, 10, 30) * 4)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=300, slots=16, check_every=4,
                         kv_cache="paged")
    out = generate(model, prompts, cfg, stop_ids=list(range(3, 30)), n=2)  # a stop id 1 token in ~4
    assert max(c.num_tokens for cs in out for c in cs) < 60
    e = engines[-1]
    dense = e.S * -(-e.max_len // PAGE)
    assert 0 < e.peak_blocks <= dense // 4, (e.peak_blocks, dense)


def test_flex_attention_reads_the_pool_as_the_dense_cache_does(monkeypatch):
    """The CUDA path: FlexAttention through the block mask, on the pool itself (uncompiled here).
    A prefill of ragged rows into scattered blocks, then decode steps, against the dense cache."""
    monkeypatch.setattr(PagedKVCache, "use_flex", True)
    model = _model()
    cfg, B, T, steps = model.cfg, 3, 21, 5
    lengths = [21, 9, 14]
    ids = torch.randint(1, V, (B, T + steps))
    dense = KVCache(cfg, B, 64, torch.float64)
    paged = PagedKVCache(cfg, B, 14, 8, 64, torch.float64)
    for r, blocks in enumerate([[5, 2, 11, 7], [1, 13, 3], [8, 4, 12, 6]]):  # out of order, interleaved
        paged.table[r, : len(blocks)] = torch.tensor(blocks)
    pos = torch.arange(T)[None].expand(B, T)
    with torch.no_grad():
        a = model(ids[:, :T], positions=pos, cache=dense)
        b = model(ids[:, :T], positions=pos, cache=paged)
        for r, L in enumerate(lengths):  # right padding: each row's real tokens
            assert torch.allclose(a[r, :L], b[r, :L], atol=1e-10, rtol=0)
        at = torch.tensor(lengths)
        for t in range(steps):  # every row decodes from its own length
            x = ids[torch.arange(B), at][:, None]
            a = model(x, positions=at[:, None], cache=dense)
            b = model(x, positions=at[:, None], cache=paged)
            assert torch.allclose(a, b, atol=1e-10, rtol=0)
            at = at + 1


def test_a_pass_through_flex_attention_gives_the_same_tokens(engines, monkeypatch):
    monkeypatch.setattr(PagedKVCache, "use_flex", True)
    model = _model()
    prompts = _prompts((5, 18, 1))
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, slots=2, kv_cache="paged", kv_blocks=4)
    got = generate(model, prompts, cfg, stop_ids=[3, 4], n=2, return_logps=True)
    assert engines[-1].cache.flex
    _same(got, generate(model, prompts, replace(cfg, kv_cache="dense"), stop_ids=[3, 4], n=2, return_logps=True))


def test_a_pool_smaller_than_one_row_is_a_config_error(monkeypatch):
    monkeypatch.setattr(sampler, "PAGE", PAGE)
    model = _model()
    cfg = SamplingConfig(max_new_tokens=40, kv_cache="paged", kv_blocks=3)
    with pytest.raises(ConfigError, match=r"--sampling.kv_blocks=3: .* Fix: raise --sampling.kv_blocks"):
        generate(model, _prompts((10,)), cfg)


def test_paper_caps_fit_128_rows_of_an_8b_model_on_an_80_gb_gpu():
    """Llama-3-8B in bf16 (128 KiB of K and V per position) at the paper's caps, 2,048 prompt + 4,096 new
    tokens: the dense cache (0.75 GiB a slot) needs 96 GiB for 128 slots; the pool on an 80 GB H100 with
    the weights loaded holds 128 rows of 1,500 positions (a long chat prompt and response) twice over,
    or 76 rows at the full 6,144 at once."""
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    per_position = 2 * 32 * 8 * 128 * 2
    assert per_position * 6144 == 0.75 * 2 ** 30
    free = int(79.1 * 2 ** 30 - 8.03e9 * 2 - 2 ** 30)  # an H100's 79.1 GiB, less the weights and the context
    n = pool_blocks(cfg, 2, 128, 2048 + 4096, 0, free)
    page = sampler.PAGE
    assert n * page * per_position <= free - sampler.HEADROOM
    assert n * page >= 2 * 128 * 1500 and n // -(-6144 // page) >= 74
    assert pool_blocks(cfg, 2, 128, 6144, 0, None) * page * per_position > 96 * 2 ** 30, "no GPU: room for all"


def test_where_compiled_flex_attention_cannot_run_the_pool_is_read_through_sdpa(monkeypatch, capsys):
    """A GPU without a working compile stack: the probe fails once, says so, and the cache reads
    each row's blocks gathered (the path every CPU test above checks)."""
    def broken(*a, **k):
        raise RuntimeError("triton: no kernel for this device\nmore detail")
    monkeypatch.setattr(M, "flex_attend", broken)
    M.flex_compiles.cache_clear()
    try:
        assert not M.flex_compiles(4, 2, 16, torch.float32, torch.device("cpu"))
    finally:
        M.flex_compiles.cache_clear()
    err = capsys.readouterr().err
    assert "RuntimeError: triton: no kernel for this device)" in err and "reads through SDPA" in err
