"""The readings the paper leaves open (issue 29), one flag each: every flag changes exactly what it
names, checked by a tiny run against the default run on the same inputs.

    --em.on_stop end|skip         what a τ stop does (τ = 1 forces one: a tiny policy never wins all)
    --em.round_ref prev_round|pi0 the selection reference of a later round's first iteration
    --em.st_pairs all|first       the self-training pairs of the M-step
    --em.tie_credit 0|0.5         Eq. 6's credit for a tie (by hand, then in a run)
    --sandbox.oracle_pseudo_labels   gold-labelled pseudo-pairs (a positive control, sandbox only)
"""
import json
from pathlib import Path

import pytest

from mt import em, gold, sandbox
from test_run_em import args, artifacts, inputs, run_em  # noqa: F401  (inputs: a fixture)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.stat().st_size else []


def _stages(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _same(a: Path, b: Path, prefix: str) -> list[str]:
    """The result files under `prefix` whose bytes differ between runs a and b (config.json aside)."""
    x, y = artifacts(a), artifacts(b)
    keys = [k for k in set(x) | set(y) if k.startswith(prefix) and k != "config.json"]
    return sorted(k for k in keys if x.get(k) != y.get(k))


@pytest.fixture(scope="module")
def default(inputs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("readings") / "default"
    run_em(args(inputs, out))
    return out


# ---- Eq. 6's tie credit, by hand


def test_half_credit_win_rate_by_hand():
    new, old = [1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 3.0]  # tie, win, tie, loss
    strict = em.win_rate(new, old)
    assert (strict["wins"], strict["ties"], strict["losses"]) == (1, 2, 1)
    assert strict["win_rate"] == 1 / 4  # Eq. 6: a tie is no win
    assert em.win_rate(new, old, tie_credit=0.5)["win_rate"] == (1 + 0.5 * 2) / 4
    # the credit decides both the argmax and the τ test: A wins 2 of 4 outright, B 1 with 3 ties
    a = em.win_rate([2, 2, 0, 0], [1, 1, 1, 1], 0.5)["win_rate"]  # 0.5 either way
    b = em.win_rate([2, 1, 1, 1], [1, 1, 1, 1], 0.5)["win_rate"]  # 0.25 strict, 0.625 half
    assert (a, b) == (0.5, 0.625)
    strict_choice = em.select_checkpoint({"A": 0.5, "B": 0.25}, tau=0.6, order=["A", "B"])
    half_choice = em.select_checkpoint({"A": a, "B": b}, tau=0.6, order=["A", "B"])
    assert strict_choice == {"chosen": None, "best": "A", "win_rate": 0.5, "stop": True, "tau": 0.6}
    assert half_choice == {"chosen": "B", "best": "B", "win_rate": 0.625, "stop": False, "tau": 0.6}


# ---- what a τ stop does


@pytest.fixture(scope="module")
def stops(inputs, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("stops")
    runs = {}
    for how in ("end", "skip"):
        runs[how] = root / how
        run_em(args(inputs, runs[how]) + ["--em.tau", "1", "--em.on_stop", how])
    return runs


def test_a_stop_ends_the_run_by_default_and_skips_the_iteration_with_skip(inputs, stops):  # noqa: F811
    end, skip = stops["end"], stops["skip"]
    # τ = 1: every iteration's best checkpoint loses somewhere on D_MS, so each one stops
    for run, iters in ((end, [1]), (skip, [1, 2])):
        summary = json.loads((run / "summary.json").read_text())
        assert [h["iter"] for h in summary["iterations"]] == iters
        assert all(h["selection"]["stop"] for h in summary["iterations"])
        assert summary["policy"] == str((inputs / "policy").resolve())  # π0 kept
        assert summary["rm"] == str((inputs / "rm").resolve())  # r0 kept
    e_step_and_select = ["sample", "score", "pairs", "ref_logps", "dpo", "select"]
    assert list(_stages(end)) == ["splits", *(f"iter1/{s}" for s in e_step_and_select)]
    assert list(_stages(skip)) == ["splits", *(f"iter{t}/{s}" for t in (1, 2)
                                               for s in e_step_and_select)]
    # skip: iteration 2 ran on D_2 with the models iteration 1 kept, π0 and r0
    st = _stages(skip)
    assert str(inputs / "policy") in st["iter2/sample"]["inputs"]
    assert "splits/D_2.jsonl" in st["iter2/sample"]["inputs"]
    assert str(inputs / "rm") in st["iter2/score"]["inputs"]
    assert str(inputs / "policy") in st["iter2/select"]["inputs"]
    # ... and iteration 1 is the same either way: the flag only decides what comes after a stop
    assert _same(end, skip, "iter1/") == [] and _same(end, skip, "splits/") == []


def test_status_plans_every_stage_of_a_skip_run_in_order(stops):
    """`run_em.py status` plans from mt/manifest.py run_stages, which must know that under skip
    the run goes on after a stop: every recorded stage listed in order, done, none cut."""
    for how, run in stops.items():
        recorded = list(_stages(run))
        text = run_em(["status", "--out", str(run)]).stdout
        listed = [tuple(line.split()[:2]) for line in text.splitlines()
                  if line.split() and line.split()[0] in ("done", "running", "left", "skipped")]
        if how == "skip":
            assert listed == [("done", name) for name in recorded], text
            assert "finished (τ stop at iter1, iter2)" in text.splitlines()[0], text
        else:  # end: the stages the stop cut are listed after the done ones, as skipped
            assert listed[:len(recorded)] == [("done", name) for name in recorded], text
            assert {s for s, _ in listed[len(recorded):]} == {"skipped"}
            assert "iter2/sample" in [n for _, n in listed[len(recorded):]]


# ---- the selection reference of a later round's first iteration


def test_round_ref_pi0_selects_round_2_against_pi0_and_changes_nothing_before(inputs, tmp_path):  # noqa: F811
    runs = {}
    for ref in ("prev_round", "pi0"):
        runs[ref] = tmp_path / ref
        run_em(args(inputs, runs[ref]) + ["--iters", "1", "--em.rounds", "2", "--em.round_ref", ref])
    prev, pi0 = runs["prev_round"], runs["pi0"]
    r1 = prev / "round1" / "iter1"
    pi1 = (r1 / "policy" / json.loads((r1 / "selection.json").read_text())["chosen"])
    sel_prev, sel_pi0 = _stages(prev)["round2/iter1/select"], _stages(pi0)["round2/iter1/select"]
    assert pi1.relative_to(prev).as_posix() in sel_prev["inputs"]  # default: round 1's final policy
    assert str(inputs / "policy") not in sel_prev["inputs"]
    assert str(inputs / "policy") in sel_pi0["inputs"]  # pi0: the policy round 2's DPO began from
    assert not any(k.startswith("round1/iter1/policy") for k in sel_pi0["inputs"])
    assert "round1/iter1/rm/final" in sel_pi0["inputs"]  # the judge is r_{t-1} either way
    # round 1 and round 2's E-step are untouched; the selection compares against other samples
    assert _same(prev, pi0, "round1/") == []
    for f in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "ref_logps.jsonl"):
        assert _same(prev, pi0, f"round2/iter1/{f}") == [], f
    assert _same(prev, pi0, "round2/iter1/selection/prev.samples.jsonl")  # π0's, not π_1's


# ---- the self-training pairs of the M-step


def test_st_pairs_first_keeps_only_the_first_iterations_pairs(inputs, default, tmp_path):  # noqa: F811
    first = tmp_path / "first"
    run_em(args(inputs, first) + ["--em.st_pairs", "first"])
    # iteration 1: ST = D_1's pairs either way, so its whole M-step is the default's
    assert _same(default, first, "iter1/") == [] and _same(default, first, "splits/") == []
    # iteration 2's E-step and pseudo-pairs are the same; only its RM's training set differs
    for f in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "selection.json",
              "pseudo_pairs.jsonl", "rm_heldout.jsonl"):
        assert _same(default, first, f"iter2/{f}") == [], f
    held = {r["prompt_id"] for r in _rows(first / "iter2" / "rm_heldout.jsonl")}
    pc = [r for r in _rows(first / "iter2" / "pseudo_pairs.jsonl")
          if r["kept"] and r["prompt_id"] not in held]

    def pairs(t):
        return [{k: r[k] for k in ("prompt_id", "prompt", "chosen", "rejected")}
                for r in _rows(default / f"iter{t}" / "pairs.jsonl")]

    def strip(rows):
        return [{k: r[k] for k in ("prompt_id", "prompt", "chosen", "rejected")} for r in rows]
    assert _rows(first / "iter2" / "rm_train.jsonl") == strip(pc) + pairs(1)
    assert _rows(default / "iter2" / "rm_train.jsonl") == strip(pc) + pairs(1) + pairs(2)


# ---- refusals


def test_the_oracle_is_refused_off_a_sandbox_world_and_without_an_m_step(inputs, tmp_path):  # noqa: F811
    p = run_em(args(inputs, tmp_path / "run") + ["--sandbox.oracle_pseudo_labels", "true"],
               check=False)
    assert p.returncode != 0 and "not a sandbox world's prompt file" in p.stderr, p.stderr[-2000:]
    assert "Fix: drop --sandbox.oracle_pseudo_labels" in p.stderr
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything is written
    p = run_em(["--preset", "sandbox-iterative-dpo", "--sandbox.oracle_pseudo_labels", "true",
                "--out", str(tmp_path / "run2")], check=False)
    assert p.returncode != 0 and "--em.update_rm false runs no M-step" in p.stderr, p.stderr[-2000:]
    p = run_em(args(inputs, tmp_path / "run3") + ["--em.tie_credit", "0.3"], check=False)
    assert p.returncode != 0 and "must be one of 0.0, 0.5" in p.stderr, p.stderr[-2000:]


# ---- the oracle M-step, by hand and on a sandbox world


def test_oracle_pseudo_pairs_take_gold_labels_and_drop_gold_ties():
    prompt = sandbox.prompt_text([3, 1, 2])
    good, worse, other_worse = "1 2 3", "1 3 2", "3 1 2"
    assert gold.gold_reward(prompt, good) > gold.gold_reward(prompt, worse)
    assert gold.gold_reward(prompt, "1 2 3") == gold.gold_reward(prompt, "1 , 2 , 3")  # a gold tie

    def row(pid, y_t, y_prev, delta, valid=True):
        return {"prompt_id": pid, "prompt": prompt, "y_t": y_t, "y_prev": y_prev, "score_t": delta,
                "score_prev": 0.0, "delta": delta, "valid": valid}
    rows = [row("a", good, worse, -5.0),  # r_{t-1} wrong and confident: lqf drops it, gold keeps it
            row("b", worse, good, 0.3),  # r_{t-1} prefers y_t, gold y_{t-1}: swapped
            row("c", "1 2 3", "1 , 2 , 3", 0.1),  # equal gold: no label
            row("d", good, good, 0.0),  # identical text
            row("e", good, other_worse, 1.0, valid=False)]
    filtered, info = em.filter_pseudo_pairs(rows, "lqf", "std", 2.0)
    out, oinfo = gold.oracle_pseudo_pairs(filtered, info)
    by = {r["prompt_id"]: r for r in out}
    assert [by[k]["reason"] for k in "abcde"] == ["kept", "kept_swapped", "gold_tie",
                                                  "identical_text", "invalid_response"]
    assert (by["a"]["chosen"], by["a"]["rejected"]) == (good, worse)
    assert (by["b"]["chosen"], by["b"]["rejected"], by["b"]["swapped"]) == (good, worse, True)
    for r in out:
        if r["kept"]:
            assert gold.gold_reward(prompt, r["chosen"]) > gold.gold_reward(prompt, r["rejected"])
    assert [by[k]["filter_kept"] for k in "ab"] == [r["kept"] for r in filtered[:2]]
    assert oinfo["kept_total"] == 2 and oinfo["labels"] == "gold" and oinfo["eps_t"] == info["eps_t"]
    assert oinfo["filter_kept_total"] == info["kept_total"]


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """One small sandbox world, and a one-iteration run of the sandbox preset on it three ways:
    the default, the oracle M-step, and half-credit ties. Short lists without separators and a
    policy trained enough to answer most of them (π0 gold ≈ 0.8) give identical responses, so
    Eq. 6 meets ties and the oracle meets gold ties."""
    root = tmp_path_factory.mktemp("readings_world")
    w = sandbox.build_world(seed=5, cache_dir=root / "cache", n_prompts=40, sft_examples=6400,
                            sft_epochs=2, rm_prompts=40, rm_epochs=1, eval_prompts=16,
                            list_len=(2, 4), separators=0.0, demo_clean=0.5)
    base = ["--preset", "sandbox", "--policy", str(w.policy_dir), "--rm", str(w.rm_dir),
            "--prompts", str(w.prompts_path), "--iters", "1", "--em.d_ms_size", "12",
            "--em.tau", "0", "--dpo.batch_size", "8", "--dpo.micro_batch_size", "8",
            "--dpo.save_every", "1", "--rm_train.batch_size", "8",
            "--rm_train.micro_batch_size", "8"]
    runs = {}
    for name, extra in (("default", []), ("oracle", ["--sandbox.oracle_pseudo_labels", "true"]),
                        ("half", ["--em.tie_credit", "0.5"])):
        runs[name] = root / name
        run_em(base + ["--out", str(runs[name])] + extra)
    return runs


def test_oracle_m_step_labels_by_gold_and_changes_only_the_labels(world_runs):
    default, oracle = world_runs["default"], world_runs["oracle"]
    # everything before the pseudo-pairs' labels is the default's: E-step, selection, samples
    assert _same(default, oracle, "splits/") == []
    for f in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "policy/", "selection", "pseudo/"):
        assert _same(default, oracle, f"iter1/{f}") == [], f
    rows = _rows(oracle / "iter1" / "pseudo_pairs.jsonl")
    base = {r["prompt_id"]: r for r in _rows(default / "iter1" / "pseudo_pairs.jsonl")}
    assert [r["prompt_id"] for r in rows] == list(base)
    for r in rows:
        b = base[r["prompt_id"]]
        assert (r["y_t"], r["y_prev"], r["delta"], r["valid"]) == (b["y_t"], b["y_prev"],
                                                                    b["delta"], b["valid"])
        g_c, g_r = (gold.gold_reward(r["prompt"], r[k]) for k in ("chosen", "rejected"))
        if r["kept"]:  # gold's order, whatever r_{t-1} said
            assert g_c > g_r and r["reason"] in ("kept", "kept_swapped")
        else:  # dropped only when gold has no order, the text is identical, or a response invalid
            assert r["reason"] in ("gold_tie", "identical_text", "invalid_response")
            assert r["reason"] != "gold_tie" or g_c == g_r
        assert r["filter_kept"] == b["kept"]  # the ε_t filter's decision, kept for comparison
    assert any(r["kept"] for r in rows)
    assert gold.pseudo_report(rows)["acc_after"] == 1.0
    # the RM trained on exactly those (minus the held-out share), plus the E-step pairs
    held = {r["prompt_id"] for r in _rows(oracle / "iter1" / "rm_heldout.jsonl")}
    train = _rows(oracle / "iter1" / "rm_train.jsonl")
    kept = [(r["prompt_id"], r["chosen"], r["rejected"]) for r in rows
            if r["kept"] and r["prompt_id"] not in held]
    assert [(r["prompt_id"], r["chosen"], r["rejected"]) for r in train[:len(kept)]] == kept
    assert len(train) == len(kept) + len(_rows(oracle / "iter1" / "pairs.jsonl"))


def test_half_credit_changes_only_the_win_rates(world_runs):
    default, half = world_runs["default"], world_runs["half"]
    for f in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "policy/", "selection/"):
        assert _same(default, half, f"iter1/{f}") == [], f
    strict = json.loads((default / "iter1" / "selection.json").read_text())
    sel = json.loads((half / "iter1" / "selection.json").read_text())
    assert any(c["ties"] for c in sel["candidates"].values()), "no tie on D_MS: nothing tested"
    for k, c in sel["candidates"].items():
        s = strict["candidates"][k]
        assert (c["wins"], c["ties"], c["n"]) == (s["wins"], s["ties"], s["n"])
        assert s["win_rate"] == s["wins"] / s["n"]
        assert c["win_rate"] == (c["wins"] + 0.5 * c["ties"]) / c["n"]
    order = list(sel["candidates"])
    assert sel["chosen"] == max(order, key=lambda k: (sel["candidates"][k]["win_rate"],
                                                      -order.index(k)))


def test_report_records_the_tau_test_and_gold_step_of_every_iteration(world_runs):
    """eval/sandbox_report.py run_record: the numbers the regimes study's endpoint (4) reads."""
    from eval.sandbox_report import run_record
    for run in world_runs.values():
        it = run_record(run)["iters"][0]
        sel = json.loads((run / "iter1" / "selection.json").read_text())["candidates"]
        assert it["tau"]["best_strict"] == max(c["wins"] / c["n"] for c in sel.values())
        assert it["tau"]["best_half"] == max((c["wins"] + c["ties"] / 2) / c["n"]
                                             for c in sel.values())
        new = _rows(run / "iter1" / "gold" / "pi_t.samples.jsonl")
        old = _rows(run / "iter1" / "gold" / "pi_prev.samples.jsonl")
        g = [(gold.gold_reward(a["prompt"], x), gold.gold_reward(a["prompt"], y))
             for a, b in zip(new, old) for x, y in zip(a["responses"], b["responses"])]
        assert it["gold_step"] == {"win": sum(x > y for x, y in g) / len(g),
                                   "tie": sum(x == y for x, y in g) / len(g)}
