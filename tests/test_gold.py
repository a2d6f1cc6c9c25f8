"""The gold diagnostics (mt/gold.py): each measure against hand-computed values, the log-ratio against a
naive full-softmax loop, and a tiny sandbox run's gold.json against an independent recomputation."""
import json
import math

import pytest
import torch

from mt import chat, gold, sandbox
from mt.gold import agreement, auc, best_of_n, pseudo_report

P = "sort: 3 1 2"
# gold: "1 2 3" = 1, "1 3 2" = 1 - 0.5 / 3, "1 2" = 2 / 3
ROW = {"prompt_id": "a", "prompt": P, "responses": ["1 2 3", "1 3 2", "1 2", "1 , 2 3"]}


def test_agreement_counts_gold_ordered_pairs_by_hand():
    scores = [{"prompt_id": "a", "scores": [2.0, 1.0, 1.5, 0.5]}]
    # pairs gold orders: (0,1) agree, (0,2) agree, (1,2) disagree, (1,3) disagree, (2,3) disagree;
    # (0,3) is a gold tie (a separator between two numbers is style) and is left out
    assert agreement([ROW], scores) == {"agreement": 2 / 5, "n": 5}
    # an RM tie is a disagreement
    assert agreement([ROW], [{"prompt_id": "a", "scores": [1.0, 1.0, 0.0, 0.0]}])["agreement"] == 2 / 5


def test_best_of_n_and_auc_by_hand():
    assert best_of_n([ROW], [{"prompt_id": "a", "scores": [0.0, 0.0, 3.0, 1.0]}]) == pytest.approx(2 / 3)
    assert best_of_n([ROW], [{"prompt_id": "a", "scores": [0.0, 5.0, 5.0, 1.0]}]) == pytest.approx(1 - 0.5 / 3)
    assert auc([3, 1], [2, 1]) == 2.5 / 4 and math.isnan(auc([], [1]))


def test_pseudo_report_by_hand():
    def row(y_t, y_prev, delta, kept, reason, valid=True):
        return {"prompt_id": y_t + "|" + y_prev, "prompt": P, "y_t": y_t, "y_prev": y_prev, "delta": delta,
                "valid": valid, "kept": kept, "reason": reason, "chosen": y_t, "rejected": y_prev}
    rows = [row("1 2 3", "1 3 2", 1.0, True, "kept"),  # right
            row("1 2", "1 2 3", 0.5, True, "kept"),  # wrong
            row("1 3 2", "1 2 3", -3.0, False, "lqf_low_quality"),  # wrong, dropped
            row("1 2 3", "1 , 2 3", 0.0, False, "kept"),  # a gold tie
            row("", "1 2 3", 0.0, False, "invalid_response", valid=False)]
    r = pseudo_report(rows)
    assert (r["n"], r["valid"], r["kept"]) == (5, 4, 2)
    assert r["acc_before"] == pytest.approx(1 / 3) and r["acc_after"] == 0.5 and r["gold_ties"] == 0.25
    assert r["auc"] == 1.0  # the one right label has the largest Δr
    assert r["dropped"]["lqf_low_quality"] == {"n": 1, "acc": 0.0}
    assert r["dropped"]["invalid_response"] == {"n": 1, "acc": 0.0}


SMALL = dict(n_prompts=60, sft_examples=640, sft_epochs=1, rm_prompts=40, rm_epochs=1, eval_prompts=16)


def test_sequence_logps_and_drift_match_a_naive_loop(tmp_path):
    """log π(y|x) from the fused head equals a full-softmax sum token by token; drift(π, π) is 0."""
    from mt.checkpoint import load_model
    w = sandbox.build_world(seed=5, cache_dir=tmp_path, **SMALL)
    tok = chat.load_tokenizer(w.policy_dir)
    msgs = [{"role": "user", "content": P}]
    rows = [{"prompt_id": "a", "prompt": msgs, "responses": ["1 2 3", "3 , 1", "x"],
             "finish_reasons": ["stop", "stop", "length"]}]
    got = gold.sequence_logps(w.policy_dir, rows, micro_batch_size=1)
    assert set(got) == {("a", 0), ("a", 1)}  # a truncated response has no end of turn to score
    model = load_model(w.policy_dir).eval()
    for j in (0, 1):
        x, y = chat.encode_prompt(tok, msgs), chat.encode_response(tok, rows[0]["responses"][j])
        ids = torch.tensor([x + y])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).double(), -1)[0]
        naive = sum(logp[len(x) + i - 1, t].item() for i, t in enumerate(y))
        assert got["a", j] == pytest.approx(naive, abs=1e-4)
    assert gold.drift(w.policy_dir, w.policy_dir, rows) == 0.0


def test_world_report_names_every_generator(tmp_path):
    w = sandbox.build_world(seed=5, cache_dir=tmp_path, **SMALL)
    assert set(w.info["rm_agreement"]) == {"pi0", "mixture", *sandbox.GENERATORS}
    for v in w.info["rm_agreement"].values():
        assert v["n"] > 0 and 0.0 <= v["agreement"] <= 1.0
    # r0's pairs come from the mixture: several generators' responses, π0's among them
    pairs = [json.loads(x) for x in open(w.rm_pairs_path)]
    assert len(pairs) == w.info["rm_pairs"] > 0


def test_a_tiny_run_gold_json_matches_a_recomputation(tmp_path):
    """gold.json's numbers, recomputed from the samples it wrote through another scoring path."""
    import subprocess
    import sys

    from mt.data import read_samples
    from mt.scoring import score_conversations
    w = sandbox.build_world(seed=5, cache_dir=tmp_path / "cache", **SMALL)
    out = tmp_path / "run"
    cmd = [sys.executable, "run_em.py", "--preset", "sandbox", "--policy", str(w.policy_dir), "--rm",
           str(w.rm_dir), "--prompts", str(w.prompts_path), "--out", str(out), "--em.d_ms_size", "8",
           "--em.tau", "0", "--dpo.save_every", "2", "--em.n_samples", "3"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    it = out / "iter1"
    g = json.loads((it / "gold.json").read_text())
    samples = read_samples(it / "gold" / "pi_t.samples.jsonl")
    assert g["policy"]["gold"] == pytest.approx(sandbox.policy_gold(samples))
    items = [(r["prompt"], y) for r in samples for y in r["responses"]]
    for rm, path in (("r0", w.rm_dir), ("r_t", it / "rm" / "final")):
        flat = score_conversations(path, items, progress=False)
        scores, k = [], 0
        for r in samples:
            scores.append({"prompt_id": r["prompt_id"], "scores": flat[k:k + len(r["responses"])]})
            k += len(r["responses"])
        assert g["agreement_pi_t"][rm]["agreement"] == pytest.approx(agreement(samples, scores)["agreement"])
        assert g["best_of_n"][rm] == pytest.approx(best_of_n(samples, scores))
    curve = json.loads((it / "gold_curve.json").read_text())["curve"]
    assert [p["checkpoint"] for p in curve][0] == "start" and curve[0]["drift"] == 0.0
    assert len(curve) == 1 + len(json.loads((it / "selection.json").read_text())["candidates"])


def test_undefined_accuracies_are_written_as_null():
    """An accuracy over no pairs is NaN, which JSON cannot hold: gold.json writes null (a run once
    crashed here, after its M-step, on a filter reason whose dropped pairs were all gold ties)."""
    assert gold._json_safe({"a": [math.nan, 1.0], "b": {"c": math.nan}, "d": "x"}) == {
        "a": [None, 1.0], "b": {"c": None}, "d": "x"}
    from eval.sandbox_report import _sub, interval
    assert math.isnan(_sub(None, 1.0)) and interval([0.1, None, math.nan, 0.3])[2] == 2
