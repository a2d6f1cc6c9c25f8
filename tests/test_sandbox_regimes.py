"""eval/sandbox_regimes.py: the regimes plan's endpoints, intervals and decision rules, on JSON that
eval/sandbox_report.py itself writes (its `report` over fake run directories whose gold files hold
hand-chosen numbers), checked against values computed here by hand."""
import json
import math
import sys

import pytest

from eval import sandbox_regimes as R
from eval import sandbox_report
from mt import dist
from mt.errors import UserError

SEEDS = [15, 16, 17, 18]
LRS = ("1e-05", "2e-05", "5e-05")
PROMPT, GOOD, BAD = "sort: 4 3 2 1", "1 2 3 4", "1 2 3"  # gold 1 and below 1
N = 20  # responses per sample row: win and tie shares in steps of 1/20
CKPTS = {"ckpt-50": 50, "ckpt-100": 100, "ckpt-150": 150, "final": 163}

# per-seed differences with known classes (t(0.975, 3) = 3.182; with a seed dropped, 4.303)
POS = [0.04, 0.05, 0.06, 0.07]  # > 0 (also over any three of them)
ZERO = [0.001, -0.001, 0.002, -0.002]  # ≈ 0: contains 0, within ±0.01
WIDE = [0.03, -0.03, 0.02, -0.02]  # inconclusive: contains 0, wider than ±0.01
NEG = [-x for x in POS]  # < 0
NEAR = [0.01, -0.01, 0.015, -0.015]  # inconclusive: contains 0, within ±0.03 but not ±0.01
T95 = {2: 4.303, 3: 3.182}  # two-sided 95% t quantiles, from a printed t table


def by_hand(xs):
    """(mean, lower, upper) of a 95% t-interval, computed without the code under test."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, m - T95[n - 1] * sd / math.sqrt(n), m + T95[n - 1] * sd / math.sqrt(n)


# ---- fake run directories, in the files mt/gold.py and model selection write


def _rows(path, responses):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt_id": "p0", "prompt": PROMPT, "responses": responses,
                                "finish_reasons": ["stop"] * N, "num_tokens": [4] * N}) + "\n")


def _pair(path_new, path_old, win, tie):
    """Samples whose gold comparison, response j against j, wins `win` and ties `tie` of N."""
    w, t = round(win * N), round(tie * N)
    _rows(path_new, [GOOD] * (w + t) + [BAD] * (N - w - t))
    _rows(path_old, [BAD] * w + [GOOD] * (N - w))


def it(gold, r0=0.7, step=(0.4, 0.2), tau=(260, 0), tau_gold=(0.55, 0.25), fall=False, stop=False):
    """One iteration's numbers: π_t's gold, r0's agreement on π_t's pairs, gold's win/tie of π_t
    over π_{t-1}, the best candidate's Eq. 6 (wins, ties) of 400, gold's win/tie on the responses
    τ judged; fall: ckpt-100's gold above the final's (over-optimisation)."""
    return dict(gold=gold, r0=r0, step=step, tau=tau, tau_gold=tau_gold, fall=fall, stop=stop)


def fake_run(run, iters):
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"em": {"rounds": 1}, "iters": len(iters)}))
    prev = 0.80
    for t, x in enumerate(iters, 1):
        d = run / f"iter{t}"
        wins, ties = x["tau"]
        cands = {k: {"wins": wins - (k != "final") * 40, "ties": ties, "n": 400} for k in CKPTS}
        for c in cands.values():
            c["win_rate"] = c["wins"] / c["n"]
        (d / "selection").mkdir(parents=True)
        (d / "selection.json").write_text(json.dumps(
            {"candidates": cands, "best": "final", "chosen": None if x["stop"] else "final"}))
        for k in CKPTS:
            _pair(d / "selection" / f"{k}.samples.jsonl", d / "selection" / "prev.samples.jsonl",
                  *x["tau_gold"])
        _pair(d / "gold" / "pi_t.samples.jsonl", d / "gold" / "pi_prev.samples.jsonl", *x["step"])
        (d / "pairs.jsonl").write_text(json.dumps({"prompt_id": "p0", "prompt": PROMPT,
                                                   "chosen": GOOD, "rejected": BAD}) + "\n")
        g = x["gold"]
        golds = {"ckpt-50": g - 0.03, "ckpt-100": g + 0.03 if x["fall"] else g - 0.02,
                 "ckpt-150": g - 0.01, "final": g}
        curve = [{"checkpoint": "start", "step": 0, "gold": prev, "drift": 0.0}] + [
            {"checkpoint": k, "step": s, "gold": golds[k], "drift": 0.1, "win_rate": 0.6,
             "ties": 0.0} for k, s in CKPTS.items()]
        (d / "gold_curve.json").write_text(json.dumps({"curve": curve, "chosen": "final"}))
        rms = ("r0", "r_prev", "r_t")
        (d / "gold.json").write_text(json.dumps({
            "policy": {"gold": g, "prev_gold": prev, "perfect": 0.3, "gold_win_vs_pi0": 0.6,
                       "best_of_n_oracle": 0.98},
            "agreement_pi_t": {k: {"agreement": x["r0"] if k == "r0" else 0.7} for k in rms},
            "agreement_pi_prev": {k: {"agreement": 0.7} for k in rms},
            "best_of_n": {k: 0.9 for k in rms}, "st_pairs_gold_acc": 0.8, "pseudo": None}))
        prev = g


def runs_of(p, i):
    """Every variant's iterations for seed index i under a rate's parameters p."""
    b = 0.85 + 0.01 * i
    ns2 = b + p["d2"][i]
    mt_tau = p.get("mt_tau", [(260, 0)] * 4)[i]
    return {
        "iterative-dpo": [it(b - 0.02), it(b), it(b + 0.01)][:p.get("idpo_iters", {}).get(i, 3)],
        "no-select": [it(b - 0.02, r0=0.72, step=(0.3 + 0.1 * i, 0.2)),
                      it(ns2, r0=0.72 + p["r0"][i], fall=p.get("fall", False))],
        "no-select-oracle": [it(b - 0.02), it(b + p["d3"][i])],
        "mutual-taught": [it(b - 0.01, tau=mt_tau, tau_gold=(p.get("gw1", 0.55), 0.25)),
                          it(ns2 + p["dmt"][i], stop=i == 1)],
    }


def build(tmp_path, monkeypatch, scen, seeds_at=None, edit=None):
    """The plan's three JSON files, each written by eval/sandbox_report.py's own `report`."""
    monkeypatch.setattr(sandbox_report, "figures", lambda *a, **k: None)  # not under test here
    for lr, p in scen.items():
        out = tmp_path / "runs" / f"lr{lr}"
        seeds = (seeds_at or {}).get(lr, SEEDS)
        for s in seeds:
            for v, iters in runs_of(p, SEEDS.index(s)).items():
                fake_run(out / f"{v}-seed{s}", iters)
        sandbox_report.report(seeds, list(R.STUDY), out, "general", 0.0, f"regimes-lr{lr}",
                              float(lr))
    for (lr, v, s) in edit or ():  # a record the JSON lacks (a run gone from the report)
        path = tmp_path / "runs" / f"lr{lr}" / f"regimes-lr{lr}.json"
        recs = json.loads(path.read_text())
        del recs[v][str(s)]
        path.write_text(json.dumps(recs))
    return tmp_path / "runs"


def analyse(root, out, *flags):
    R.main(["--inputs", str(root), "--seeds", "15-18", "--out", str(out), *flags])
    return json.loads((out / "regimes.json").read_text())


# scenario A: the M-step does nothing, the oracle helps at every rate: R1
SCEN_A = {
    "1e-05": dict(d2=ZERO, d3=POS, dmt=ZERO, r0=NEAR, gw1=0.5,
                  mt_tau=[(260, 0), (250, 0), (240, 0), (220, 40)]),  # strict 3/4, half 4/4
    "2e-05": dict(d2=ZERO, d3=POS, dmt=POS, r0=ZERO, gw1=0.5,
                  mt_tau=[(260, 0), (250, 0), (200, 0), (200, 0)]),  # strict 2/4: not above 1/2
    "5e-05": dict(d2=ZERO, d3=POS, dmt=POS, r0=NEG, gw1=0.65, fall=True),
}
# scenario B: the M-step helps at 5e-5 only, the control fails at 2e-5, selection never helps;
# seeds dropped: 17 at 1e-5 (iterative DPO ran 2 of 3), 18 at 2e-5 (no no-select record) and
# 18 at 5e-5 (the report was written without it)
SCEN_B = {
    "1e-05": dict(d2=ZERO, d3=POS, dmt=ZERO, r0=ZERO, idpo_iters={2: 2}),
    "2e-05": dict(d2=WIDE, d3=WIDE, dmt=NEG, r0=ZERO),
    "5e-05": dict(d2=POS, d3=POS, dmt=ZERO, r0=ZERO),
}


def test_scenario_a_endpoints_by_hand_and_r1_r4_r5_fire(tmp_path, monkeypatch):
    res = analyse(build(tmp_path, monkeypatch, SCEN_A), tmp_path / "out")
    for lr, p in SCEN_A.items():
        r = res["rates"][lr]
        assert r["seeds"] == SEEDS and r["dropped"] == {}
        e = r["endpoints"]
        mt_final = [p["d2"][i] + p["dmt"][i] for i in range(4)]  # relative to b
        expect = {"mt_minus_idpo": [x - 0.01 for x in mt_final], "mt_minus_ns": p["dmt"],
                  "ns_minus_idpo": p["d2"], "oracle_minus_idpo": p["d3"],
                  "oracle_minus_ns": [a - b for a, b in zip(p["d3"], p["d2"])]}
        for k, xs in expect.items():
            m, lo, hi = by_hand(xs)
            assert (e[k]["mean"], e[k]["lo"], e[k]["hi"]) == pytest.approx((m, lo, hi), abs=1e-9), k
            assert e[k]["n"] == 4 and list(e[k]["per_seed"]) == list(map(str, SEEDS))
        assert e["ns_minus_idpo"]["class"] == "≈ 0" and e["oracle_minus_idpo"]["class"] == "> 0"
        assert e["mt_minus_ns"]["class"] == {"1e-05": "≈ 0"}.get(lr, "> 0")
        d = r["r0_degrades"]
        assert (d["mean"], d["lo"], d["hi"]) == pytest.approx(by_hand(p["r0"]), abs=1e-9)
        assert d["class"] == {"1e-05": "inconclusive", "2e-05": "≈ 0", "5e-05": "< 0"}[lr]
        assert d["degrades"] == (lr == "5e-05")
        fall = r["no_select_fall"]
        assert fall["1"]["best"] == "final" and fall["1"]["class"] == "≈ 0"  # a zero interval
        if lr == "5e-05":  # final − ckpt-100 = −0.03 on every seed
            assert fall["2"]["best"] == "ckpt-100" and fall["2"]["mean"] == pytest.approx(-0.03)
            assert fall["2"]["class"] == "< 0"

    # endpoint (4) at 1e-5: the τ pass counts a win rate of exactly τ (220 + 40/2 of 400) as a pass
    four = res["rates"]["1e-05"]["per_iteration"]
    mt1, mt2 = four["mutual-taught"]["1"], four["mutual-taught"]["2"]
    assert mt1["tau_pass_strict"]["mean"] == 0.75 and mt1["tau_pass_half"]["mean"] == 1.0
    assert mt1["tau_gold_win"]["mean"] == pytest.approx(0.5)
    assert mt1["tau_gold_tie"]["mean"] == pytest.approx(0.25)
    assert (mt2["seeds"], mt2["tau_stops"]) == (4, 1)
    ns1 = four["no-select"]["1"]
    assert ns1["gold_win"]["mean"] == pytest.approx(0.45)  # 0.3, 0.4, 0.5, 0.6
    assert (ns1["gold_win"]["lo"], ns1["gold_win"]["hi"]) == pytest.approx(by_hand([.3, .4, .5, .6])[1:])
    assert ns1["gold_tie"]["mean"] == pytest.approx(0.2) and ns1["r0_agree"]["mean"] == pytest.approx(0.72)
    assert four["iterative-dpo"]["3"]["seeds"] == 4 and "3" not in four["no-select"]

    rules = res["rules"]
    assert rules["R1"]["fires"] and rules["R1"]["r0_degrades_at"] == ["5e-05"]
    assert not rules["R2"]["fires"] and not rules["R3"]["fires"]
    assert rules["R4"]["earns_keep_at"] == ["5e-05"] and not rules["R4"]["does_not"]
    assert rules["R4"]["exploratory"]  # it rests on one rate's secondary endpoint
    assert {lr: x["fires"] for lr, x in rules["R5"]["per_rate"].items()} == {
        "1e-05": True, "2e-05": False, "5e-05": False}
    md = (tmp_path / "out" / "regimes.md").read_text()
    assert "**R1** (fires)" in md and "**R2** (does not fire)" in md
    assert "earns its keep at 5e-05" in md
    # the figures (matplotlib is in requirements-lock.txt)
    assert all((tmp_path / "out" / "regimes-figures" / f).stat().st_size > 0
               for f in ("curves.png", "paired.png"))


def test_scenario_b_dropped_seeds_r2_r3_and_selection_never_helps(tmp_path, monkeypatch):
    root = build(tmp_path, monkeypatch, SCEN_B, seeds_at={"5e-05": SEEDS[:3]},
                 edit=[("2e-05", "no-select", 18)])
    res = analyse(root, tmp_path / "out")
    kept = {"1e-05": [15, 16, 18], "2e-05": [15, 16, 17], "5e-05": [15, 16, 17]}
    for lr, p in SCEN_B.items():
        r = res["rates"][lr]
        assert r["seeds"] == kept[lr]
        idx = [SEEDS.index(s) for s in kept[lr]]
        for k, key in (("ns_minus_idpo", "d2"), ("oracle_minus_idpo", "d3"), ("mt_minus_ns", "dmt")):
            m, lo, hi = by_hand([p[key][i] for i in idx])  # t with 2 degrees of freedom
            x = r["endpoints"][k]
            assert (x["mean"], x["lo"], x["hi"], x["n"]) == pytest.approx((m, lo, hi, 3), abs=1e-9)
            assert list(x["per_seed"]) == list(map(str, kept[lr]))  # the dropped one nowhere
        assert all(x["seeds"] == 3 for its in r["per_iteration"].values() for x in its.values())
    assert res["rates"]["1e-05"]["dropped"] == {"17": "iterative-dpo: 2 of its 3 iterations"}
    assert res["rates"]["2e-05"]["dropped"] == {"18": "no-select: no run"}
    assert res["rates"]["5e-05"]["dropped"] == {"18": "mutual-taught: no run; no-select: no run; "
                                                      "iterative-dpo: no run; no-select-oracle: no run"}
    classes = {lr: res["rates"][lr]["endpoints"]["ns_minus_idpo"]["class"] for lr in LRS}
    assert classes == {"1e-05": "≈ 0", "2e-05": "inconclusive", "5e-05": "> 0"}
    rules = res["rules"]
    assert not rules["R1"]["fires"] and rules["R2"]["fires"]
    assert rules["R3"]["rates"] == ["2e-05"]
    assert rules["R4"]["does_not"] and rules["R4"]["earns_keep_at"] == []
    md = (tmp_path / "out" / "regimes.md").read_text()
    assert "| 2e-05 | 3 | 18 (no-select: no run) |" in md
    assert "holds only in the gentle regime" in md and "the control failed at 2e-05" in md


def test_interval_classes_at_their_edges():
    assert R.classify(0.001, 0.02) == "> 0" and R.classify(-0.02, -0.001) == "< 0"
    assert R.classify(0.0, 0.01) == "≈ 0" and R.classify(-0.01, 0.0) == "≈ 0"  # 0 is in both
    assert R.classify(-0.0101, 0.005) == "inconclusive" and R.classify(-0.005, 0.0101) == "inconclusive"
    assert R.classify(math.nan, math.nan) == "inconclusive"  # one seed: no interval


def test_r2_needs_the_gentle_rate_not_positive(tmp_path, monkeypatch):
    """(2) > 0 at every rate: the M-step helps everywhere, so R2 (only in the strong regimes) is not met."""
    scen = {lr: dict(d2=POS, d3=POS, dmt=ZERO, r0=ZERO) for lr in LRS}
    res = analyse(build(tmp_path, monkeypatch, scen), tmp_path / "out")
    assert not res["rules"]["R2"]["fires"] and not res["rules"]["R1"]["fires"]


def test_without_matplotlib_the_tables_are_written_and_the_fix_named(tmp_path, monkeypatch, capsys):
    root = build(tmp_path, monkeypatch, SCEN_A)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    analyse(root, tmp_path / "out")
    assert "no figures: plots need matplotlib. Fix: pip install matplotlib" in capsys.readouterr().out
    assert (tmp_path / "out" / "regimes.md").is_file()
    assert not (tmp_path / "out" / "regimes-figures").exists()


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match=r"nowhere: no such file.*Fix: pass --inputs"):
        R.main(["--inputs", str(tmp_path / "nowhere")])
    root = build(tmp_path, monkeypatch, SCEN_A)
    path = root / "lr2e-05" / "regimes-lr2e-05.json"
    recs = json.loads(path.read_text())
    del recs["no-select"]["16"]["iters"][1]["tau"]  # a JSON from before the τ fields
    path.write_text(json.dumps(recs))
    with pytest.raises(UserError, match=r"regimes-lr2e-05.json: no-select seed 16, iteration 2 has "
                                        r"no field 'tau.best_strict'\. Fix: write it again"):
        R.main(["--inputs", str(root), "--out", str(tmp_path / "out")])
    (root / "lr5e-05" / "regimes-lr5e-05.json").unlink()
    # as a command: the one-paragraph error, exit status 2 (dist.run ends with os._exit)
    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(dist.os, "_exit", exit_)
    with pytest.raises(SystemExit) as e:
        dist.run(lambda: R.main(["--inputs", str(root), "--out", str(tmp_path / "out")]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "no regimes-lr$lr.json for lr 5e-05. Fix: run the plan's commands" in err


def test_r4_best_checkpoint_among_those_every_seed_reached():
    """An E-step left with fewer pairs ends before ckpt-150 (as seed 26 at 5e-5 did): R4's best is
    chosen among the checkpoints every seed has, the one left out is named with its seed."""
    def curve(golds):
        return {"curve": [{"checkpoint": k, "gold": g} for k, g in golds.items()]}
    full = {"start": 0.80, "ckpt-50": 0.90, "ckpt-100": 0.86, "ckpt-150": 0.95, "final": 0.84}
    short = {"start": 0.80, "ckpt-50": 0.88, "ckpt-100": 0.85, "final": 0.83}
    recs = {R.NS: {"15": {"iters": [curve(full), curve(full)]},
                   "16": {"iters": [curve(full), curve(short)]}}}
    fall = R.within_fall(recs, ["15", "16"])
    assert fall[1]["best"] == "ckpt-150" and fall[1]["left_out"] == {}
    assert fall[2]["best"] == "ckpt-50"  # ckpt-150 has the higher gold but seed 16 lacks it
    assert fall[2]["left_out"] == {"ckpt-150": ["16"]}
    assert fall[2]["per_seed"] == {"15": pytest.approx(0.84 - 0.90, abs=1e-12),
                                 "16": pytest.approx(0.83 - 0.88, abs=1e-12)}
    assert "ckpt-150 left out: not reached by seed 16" in R._left_out(fall[2])
