"""The experiment as the paper defines it (issue 13): ε_t in the units of Δr, so rescaling an RM's scores
changes no filter decision; σ over the valid rows only; the same text always gets the same score, so an
identical response is a tie in every rule."""
import random

import pytest

from mt import em
from mt.data import read_scores, write_jsonl
from mt.scoring import score_conversations, score_files

QS = ["What is two plus two?", "Write a short poem about the sea.", "Explain why the sky is blue"]
ANSWERS = ["four", "The sea is blue and wide.", "Hello world, how are you today? I am fine", "two plus two",
           "The quick brown fox jumps over the lazy dog. " * 3, "fine"]


def _pseudo_rows(n=60, seed=0, scale=1.0, shift=0.0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prev, new = rng.gauss(0, 1), rng.gauss(0.3, 1)
        valid = i % 7 != 0  # some invalid rows, with wild scores that must not enter σ
        if not valid:
            prev = 50.0 * rng.choice((-1, 1))
        s_prev, s_new = scale * prev + shift, scale * new + shift
        rows.append({"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": "x"}], "y_t": f"new {i}",
                     "y_prev": f"old {i}", "score_t": s_new, "score_prev": s_prev, "delta": s_new - s_prev,
                     "valid": valid})
    return rows


@pytest.mark.parametrize("strategy", ["lqf", "hqs", "dst", "none"])
@pytest.mark.parametrize("c", [0.01, 0.37, 1.0, 12.5, 1000.0])
def test_filter_decisions_do_not_change_when_the_scores_are_rescaled(strategy, c):
    base, info = em.filter_pseudo_pairs(_pseudo_rows(), strategy, "std", 2.0)
    scaled, info_c = em.filter_pseudo_pairs(_pseudo_rows(scale=c, shift=3.0), strategy, "std", 2.0)
    decide = [(r["kept"], r["swapped"], r["reason"]) for r in base]
    assert decide == [(r["kept"], r["swapped"], r["reason"]) for r in scaled]
    assert info_c["eps_t"] == pytest.approx(c * info["eps_t"], rel=1e-9)
    if strategy in ("lqf", "hqs"):  # the rule really cuts on these rows: the test is not vacuous
        assert 0 < sum(r["kept"] for r in base) < sum(r["valid"] for r in base)


def test_the_literal_variance_reading_is_not_scale_invariant():
    """The appendix-B wording (2 × Var) compares score² with a score: a rescaled RM filters differently."""
    a, _ = em.filter_pseudo_pairs(_pseudo_rows(), "lqf", "var", 2.0)
    b, _ = em.filter_pseudo_pairs(_pseudo_rows(scale=10.0), "lqf", "var", 2.0)
    assert [r["kept"] for r in a] != [r["kept"] for r in b]


def test_sigma_is_computed_on_the_valid_rows_only_and_recorded():
    rows = _pseudo_rows()
    _, info = em.filter_pseudo_pairs(rows, "lqf", "std", 2.0)
    valid = [r["score_prev"] for r in rows if r["valid"]]
    mean = sum(valid) / len(valid)
    sigma = (sum((x - mean) ** 2 for x in valid) / len(valid)) ** 0.5  # population σ, by hand
    assert info["eps_rows"] == len(valid) < len(rows)
    assert info["score_prev_std"] == pytest.approx(sigma) and info["eps_t"] == pytest.approx(2 * sigma)
    assert (info["eps_stat"], info["eps_mult"]) == ("std", 2.0)


def test_the_same_text_gets_a_bit_identical_score_whatever_its_batch(tiny_rm_dir):
    items = [([{"role": "user", "content": QS[i % 3]}], a) for i, a in enumerate(ANSWERS)]
    target = items[1]
    alone = score_conversations(tiny_rm_dir, [target], progress=False)[0]
    for batch_size in (1, 2, 3, 64):  # other neighbours, other batch widths, the target at other places
        rng = random.Random(batch_size)
        mixed = items + [target] * 3
        rng.shuffle(mixed)
        got = score_conversations(tiny_rm_dir, mixed, batch_size=batch_size, progress=False)
        same = {s for it, s in zip(mixed, got) if it == target}
        assert len(same) == 1  # every copy of the text: one score, bit for bit
    # scored once per call, among different neighbours: equal to float rounding, not necessarily in bits
    assert next(iter(same)) == pytest.approx(alone, abs=1e-5)


def test_a_samples_file_against_itself_is_all_ties(tiny_rm_dir, tmp_path):
    rows = [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": QS[i % 3]}], "responses": [a],
             "finish_reasons": ["stop"], "num_tokens": [3]} for i, a in enumerate(ANSWERS)]
    write_jsonl(tmp_path / "a.samples.jsonl", rows)
    write_jsonl(tmp_path / "b.samples.jsonl", rows[::-1])  # other order: other batches in a separate call
    score_files(tiny_rm_dir, [(tmp_path / "a.samples.jsonl", tmp_path / "a.scores.jsonl"),
                              (tmp_path / "b.samples.jsonl", tmp_path / "b.scores.jsonl")], progress=False)
    a = {r["prompt_id"]: r["scores"][0] for r in read_scores(tmp_path / "a.scores.jsonl")}
    b = {r["prompt_id"]: r["scores"][0] for r in read_scores(tmp_path / "b.scores.jsonl")}
    res = em.win_rate([a[k] for k in a], [b[k] for k in a])  # Eq. 6, as model selection computes it
    assert (res["wins"], res["losses"], res["ties"], res["win_rate"]) == (0, 0, len(ANSWERS), 0.0)
