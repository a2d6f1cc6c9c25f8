"""Algorithm 1's decision rules against hand-computed values (mt/em.py)."""
import math

import pytest

from mt import em


def sample(pid, responses, finish=None, ntok=None):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": pid}], "responses": responses,
            "finish_reasons": finish or ["stop"] * len(responses),
            "num_tokens": ntok or [len(r.split()) for r in responses]}


# ---- partition


def test_partition_sizes_disjoint_and_stable():
    ids = [f"p{i}" for i in range(100)]
    parts = em.partition(ids, iters=2, rm_fraction=1 / 3, d_ms_size=10, seed=0)
    assert len(parts["D_MS"]) == 10 and len(parts["D_R"]) == 30
    assert len(parts["D_1"]) == 30 and len(parts["D_2"]) == 30
    flat = [i for v in parts.values() for i in v]
    assert sorted(flat) == sorted(ids)  # disjoint and complete
    # stable across restarts and file order; different for another seed
    assert em.partition(list(reversed(ids)), 2, 1 / 3, 10, seed=0) == parts
    assert em.partition(ids, 2, 1 / 3, 10, seed=1) != parts
    # adding prompts never moves an old prompt between D_MS and the rest in an arbitrary way:
    # the order is by hash, so the old D_MS members that remain first stay in D_MS
    more = em.partition(ids + [f"q{i}" for i in range(5)], 2, 1 / 3, 10, seed=0)
    assert len(set(more["D_MS"]) & set(parts["D_MS"])) >= 5


def test_partition_errors_name_the_flags():
    with pytest.raises(ValueError, match="d_ms_size"):
        em.partition(["a", "b"], 2, 1 / 3, 5, 0)
    with pytest.raises(ValueError, match="D_"):
        em.partition(["a", "b", "c"], 2, 1 / 3, 1, 0)
    with pytest.raises(ValueError, match="unique"):
        em.partition(["a", "a", "b"], 1, 0.5, 0, 0)


# ---- length-controlled pairs (appendix B)


def test_length_control_picks_shortest_above_mean_and_lowest():
    # scores 1, 4, 3, 0 -> mean 2; above mean: idx 1 (4 tokens), idx 2 (2 tokens) -> chosen idx 2
    s = sample("x", ["a b c", "a b c d", "a b", "z"])
    pairs, stats = em.make_pairs([s], [{"prompt_id": "x", "scores": [1.0, 4.0, 3.0, 0.0]}])
    assert (pairs[0]["chosen_index"], pairs[0]["rejected_index"]) == (2, 3)
    assert pairs[0]["chosen"] == "a b" and pairs[0]["rejected"] == "z"
    # max_min takes the top score instead
    pairs, _ = em.make_pairs([s], [{"prompt_id": "x", "scores": [1.0, 4.0, 3.0, 0.0]}], rule="max_min")
    assert (pairs[0]["chosen_index"], pairs[0]["rejected_index"]) == (1, 3)
    assert stats["pairs"] == 1


def test_length_control_ties():
    # equal lengths above the mean -> higher score wins; equal lowest scores -> the earlier is rejected
    s = sample("x", ["a b", "c d", "e", "f"], ntok=[2, 2, 1, 1])
    c, r = em.choose_pair([3.0, 5.0, 0.0, 0.0], [2, 2, 1, 1], [0, 1, 2, 3], "length_control")
    assert (c, r) == (1, 2)
    # a score equal to the mean is not "above" it: scores 2, 2, 2, 6 -> mean 3, only idx 3 above
    c, r = em.choose_pair([2.0, 2.0, 2.0, 6.0], [1, 1, 1, 9], [0, 1, 2, 3], "length_control")
    assert (c, r) == (3, 0)
    del s


def test_pairs_drop_all_equal_empty_truncated_and_count():
    samples = [
        sample("eq", ["a", "b", "c"]),
        sample("empty", ["", "  ", "ok"]),  # only one valid response
        sample("trunc", ["a b", "c d", "e"], finish=["length", "length", "stop"]),
        sample("good", ["long answer here", "x", "short"]),
    ]
    scores = [{"prompt_id": "eq", "scores": [1.0, 1.0, 1.0]},
              {"prompt_id": "empty", "scores": [9.0, 9.0, 0.0]},
              {"prompt_id": "trunc", "scores": [9.0, 8.0, 0.0]},
              {"prompt_id": "good", "scores": [2.0, -1.0, 1.5]}]
    pairs, stats = em.make_pairs(samples, scores)
    assert [p["prompt_id"] for p in pairs] == ["good"]
    assert pairs[0]["chosen"] == "short" and pairs[0]["rejected"] == "x"  # mean 0.83: idx 0, 2 above
    assert stats["dropped_all_equal_scores"] == 1
    assert stats["dropped_too_few_valid"] == 2
    assert stats["empty_responses"] == 2 and stats["truncated_responses"] == 2
    # with keep_truncated the truncated ones compete: mean 5.67, idx 0 and 1 above with 2 tokens each,
    # the tie on length goes to the higher score (idx 0); empty responses are never used
    pairs, _ = em.make_pairs(samples, scores, keep_truncated=True)
    trunc = [p for p in pairs if p["prompt_id"] == "trunc"][0]
    assert trunc["chosen"] == "a b" and trunc["rejected"] == "e"
    assert "empty" not in [p["prompt_id"] for p in pairs]


def test_pairs_identical_text_dropped():
    pairs, stats = em.make_pairs([sample("x", ["same", "same", "other"])],
                                 [{"prompt_id": "x", "scores": [5.0, 0.0, 1.0]}])
    assert not pairs and stats["dropped_identical_text"] == 1


# ---- selection (Eq. 6-7)


def test_win_rate_is_strict():
    r = em.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 5.0, -1.0])
    assert r == {"wins": 2, "ties": 1, "losses": 1, "n": 4, "win_rate": 0.5}


def test_selection_argmax_tie_and_tau_stop():
    order = ["ckpt-50", "ckpt-100", "final"]
    r = em.select_checkpoint({"ckpt-50": 0.62, "ckpt-100": 0.7, "final": 0.7}, tau=0.6, order=order)
    assert r["chosen"] == "ckpt-100" and not r["stop"]  # tie at 0.7: the earlier one
    r = em.select_checkpoint({"ckpt-50": 0.59, "ckpt-100": 0.2, "final": 0.5}, tau=0.6, order=order)
    assert r["stop"] and r["chosen"] is None and r["best"] == "ckpt-50"
    r = em.select_checkpoint({"ckpt-50": 0.6}, tau=0.6)  # exactly τ is enough (stop only if < τ)
    assert not r["stop"]
    r = em.select_checkpoint({"ckpt-50": 0.9, "final": 0.1}, tau=0.6, select=False, order=["ckpt-50", "final"])
    assert r["chosen"] == "final" and not r["stop"]


# ---- ε_t and filtering (Sec. 4.3, appendix B/F)


def test_epsilon_var_and_std():
    old = [1.0, 3.0, 5.0, 7.0]  # mean 4, population variance 5
    assert em.epsilon(old, "var", 2.0) == pytest.approx(10.0)
    assert em.epsilon(old, "std", 1.0) == pytest.approx(math.sqrt(5.0))
    with pytest.raises(ValueError, match="eps_stat"):
        em.epsilon(old, "mad", 1.0)


@pytest.mark.parametrize("strategy,delta,expected", [
    ("lqf", -2.0, (False, False)), ("lqf", -1.0, (False, False)), ("lqf", -0.5, (True, False)),
    ("lqf", 3.0, (True, False)),
    ("hqs", 1.0, (True, False)), ("hqs", 0.99, (False, False)), ("hqs", -5.0, (False, False)),
    ("dst", 0.1, (True, False)), ("dst", -0.1, (True, True)), ("dst", 0.0, (False, False)),
    ("none", -9.0, (True, False)),
])
def test_filter_decision(strategy, delta, expected):
    keep, swap, _ = em.filter_decision(delta, 1.0, strategy)
    assert (keep, swap) == expected


def test_pseudo_pairs_end_to_end_by_hand():
    ids = ["a", "b", "c", "d"]
    new = [sample(i, [f"new {i}"]) for i in ids]
    old = [sample(i, [f"old {i}"]) for i in ids]
    new[3]["finish_reasons"] = ["length"]  # truncated: no pair
    s_new = [{"prompt_id": i, "scores": [v]} for i, v in zip(ids, [5.0, 0.0, 2.0, 9.0])]
    s_old = [{"prompt_id": i, "scores": [v]} for i, v in zip(ids, [1.0, 3.0, 2.5, 2.0])]
    # ε_t is over the valid rows (d is invalid): old scores 1, 3, 2.5 -> mean 13/6,
    # var = (49/36 + 25/36 + 4/36) / 3 = 13/18, so 2 × var = 13/9
    raw = em.make_pseudo_pairs(new, old, s_new, s_old)
    assert [r["valid"] for r in raw] == [True, True, True, False]
    rows, info = em.filter_pseudo_pairs(raw, "lqf", "var", 2.0)
    assert info["eps_t"] == pytest.approx(13 / 9) and info["eps_rows"] == 3
    # deltas: a +4 keep, b -3 drop (<= -eps), c -0.5 keep (regularisation), d invalid
    assert [r["kept"] for r in rows] == [True, False, True, False]
    assert [r["reason"] for r in rows] == ["kept", "lqf_low_quality", "kept", "invalid_response"]
    assert rows[0]["chosen"] == "new a" and rows[0]["rejected"] == "old a"
    rows, info = em.filter_pseudo_pairs(raw, "dst", "var", 2.0)
    assert rows[1]["kept"] and rows[1]["chosen"] == "old b"  # dst relabels by the sign of Δr
    rows, info = em.filter_pseudo_pairs(raw, "hqs", "std", 1.0)
    assert [r["kept"] for r in rows] == [True, False, False, False]  # only Δ=4 >= sqrt(13/18)
    assert info["kept_total"] == 1


def test_mix_rm_data():
    pseudo = [{"chosen": "a", "kept": True}, {"chosen": "b", "kept": False}]
    st = [{"chosen": "s1"}, {"chosen": "s2"}]
    assert [p["chosen"] for p in em.mix_rm_data(pseudo, st, "pc")] == ["a"]
    assert [p["chosen"] for p in em.mix_rm_data(pseudo, st, "st")] == ["s1", "s2"]
    assert [p["chosen"] for p in em.mix_rm_data(pseudo, st, "mixed")] == ["a", "s1", "s2"]
    with pytest.raises(ValueError, match="rm_data"):
        em.mix_rm_data(pseudo, st, "both")
