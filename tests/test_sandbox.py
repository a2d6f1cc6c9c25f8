"""The gold-reward sandbox: the gold reward's ranking, the tokenizer with mt/chat.py, determinism, the shift."""
import hashlib
import random
from pathlib import Path

import pytest
import torch

import train_policy
from mt import chat, em, flags, sandbox
from mt import config as C
from mt.data import read_prompts, write_jsonl
from mt.sandbox import gold_reward

# ---- the gold reward

P = "sort: 7 3 9 1"


def test_gold_ranks_hand_made_responses():
    perfect, swap, missing, garbage = "1 3 7 9", "1 7 3 9", "1 3 9", "sort : sort"
    g = [gold_reward(P, r) for r in (perfect, swap, missing, garbage)]
    assert g[0] == 1.0 and g[0] > g[1] > g[2] > g[3] == 0.0
    # closed forms: one inversion of C(4,2)=6 pairs costs 0.5/6; one missing item keeps recall 3/4
    assert g[1] == pytest.approx(1 - 0.5 / 6) and g[2] == pytest.approx(0.75)
    assert gold_reward(P, "1 3 3 7 9") == pytest.approx(4 / 5)  # a repeat: precision 4/5
    assert gold_reward(P, "9 7 3 1") == pytest.approx(0.5)  # reversed: all 6 pairs inverted
    assert gold_reward(P, "") == 0.0 and gold_reward(P, "1 3 7 9 12") == pytest.approx(4 / 5)
    assert gold_reward([{"role": "user", "content": P}], perfect) == 1.0  # a chat prompt works too


@pytest.mark.parametrize("n", range(sandbox.LIST_LEN[0], sandbox.LIST_LEN[1] + 1))
def test_one_swap_beats_one_missing_item_at_every_length(n):
    rng = random.Random(n)
    for _ in range(20):
        nums = rng.sample(range(sandbox.NUM_MAX), n)
        s = sorted(nums)
        i = rng.randrange(n - 1)
        swapped = s[:i] + [s[i + 1], s[i]] + s[i + 2:]
        dropped = s[:i] + s[i + 1:]
        p = sandbox.prompt_text(nums)
        assert 1.0 == gold_reward(p, " ".join(map(str, s))) > gold_reward(p, " ".join(map(str, swapped))) \
            > gold_reward(p, " ".join(map(str, dropped))) > 0


def test_corrupted_demonstrations_are_imperfect_but_close():
    rng = random.Random(0)
    golds = []
    for _ in range(2000):
        nums = sandbox.make_numbers(rng)
        demo = sandbox.corrupt(sorted(nums), rng)
        golds.append(gold_reward(sandbox.prompt_text(nums), " ".join(map(str, demo))))
    mean, perfect = sum(golds) / len(golds), sum(g == 1.0 for g in golds) / len(golds)
    assert 0.7 < mean < 0.95 and 0.2 < perfect < 0.5


def test_prompts_are_deterministic_and_readable(tmp_path):
    path = sandbox.write_prompts(tmp_path / "p.jsonl", 50, seed=3)
    rows = read_prompts(path)
    assert [p["prompt_id"] for p in rows] == [r["id"] for r in sandbox.make_prompts(50, seed=3)]
    assert sandbox.make_prompts(50, seed=3) == sandbox.make_prompts(50, seed=3) != sandbox.make_prompts(50, seed=4)
    for p in rows:
        nums = sandbox.parse_numbers(p["prompt"])
        assert len(set(nums)) == len(nums) and sandbox.LIST_LEN[0] <= len(nums) <= sandbox.LIST_LEN[1]


# ---- the tokenizer through mt/chat.py


def test_tokenizer_with_chat_helpers(tmp_path):
    sandbox.build_tokenizer(tmp_path)
    tok = chat.load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": P}]
    ids = chat.encode_prompt(tok, msgs)
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<|user|>", "sort", ":", "7", "3", "9", "1", "<|end|>",
                                              "<|assistant|>"]  # one BOS, one token per number
    resp = chat.encode_response(tok, "1 3 7 9")
    end = tok.convert_tokens_to_ids("<|end|>")
    assert resp[-1] == end == chat.end_of_turn_id(tok) and end in chat.stop_ids(tok)
    assert tok.decode(resp[:-1]) == "1 3 7 9"  # text round-trips, so gold can read decoded samples
    assert chat.encode_conversation(tok, msgs, "1 3 7 9") == ids + resp


# ---- the build: deterministic, cached, Hugging Face shaped

SMALL = dict(n_prompts=40, sft_examples=640, sft_epochs=1, rm_prompts=40, rm_epochs=1, eval_prompts=16)


def _hashes(world) -> dict[str, str]:
    files = [world.prompts_path, world.rm_pairs_path, world.policy_dir / "model.safetensors",
             world.rm_dir / "model.safetensors", world.policy_dir / "tokenizer.json",
             world.policy_dir / "generation_config.json"]
    return {f.name if f.parent == world.root else f"{f.parent.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


def test_same_seed_same_artifacts(tmp_path):
    a = sandbox.build_world(seed=5, cache_dir=tmp_path / "a", **SMALL)
    b = sandbox.build_world(seed=5, cache_dir=tmp_path / "b", **SMALL)
    c = sandbox.build_world(seed=6, cache_dir=tmp_path / "a", **SMALL)
    assert _hashes(a) == _hashes(b)  # two independent builds, byte for byte
    ha, hc = _hashes(a), _hashes(c)
    assert all(ha[k] != hc[k] for k in ("prompts.jsonl", "policy/model.safetensors", "rm/model.safetensors"))
    # a second call is served from the cache: same directory, nothing rebuilt
    stamp = (a.root / "world.json").stat().st_mtime_ns
    again = sandbox.build_world(seed=5, cache_dir=tmp_path / "a", **SMALL)
    assert again.root == a.root and (again.root / "world.json").stat().st_mtime_ns == stamp
    assert again.info["config"]["seed"] == 5 and again.gold is gold_reward


def test_world_loads_in_transformers_and_scores_match(tmp_path):
    """π0 and r0 are plain Hugging Face directories: transformers' Llama classes give our logits and scores."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mt.checkpoint import load_model
    from mt.scoring import score_conversations
    w = sandbox.build_world(seed=5, cache_dir=tmp_path, **SMALL)
    tok = chat.load_tokenizer(w.policy_dir)
    msgs = [{"role": "user", "content": P}]
    items = [(msgs, "1 3 7 9"), (msgs, "9 7"), (msgs, "1 3 3 7 9 9")]
    ours = score_conversations(w.rm_dir, items, progress=False)
    hf_rm = AutoModelForSequenceClassification.from_pretrained(str(w.rm_dir), attn_implementation="eager").eval()
    assert type(hf_rm).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        ref = [hf_rm(torch.tensor([chat.encode_conversation(tok, m, y)])).logits.item() for m, y in items]
    assert ours == pytest.approx(ref, abs=1e-4)
    # rm_gold_agreement against a naive count with the transformers scores
    pairs = [{"prompt_id": "a", "prompt": msgs, "chosen": c, "rejected": r} for c, r in
             [("1 3 7 9", "9 7"), ("9 7", "1 3 7 9"), ("1 3 3 7 9 9", "1 3 7 9"), ("1 3 7 9", "1 3 7 9")]]
    r = dict(zip([y for _, y in items], ref))
    want = [(r[p["chosen"]] > r[p["rejected"]]) == (gold_reward(P, p["chosen"]) > gold_reward(P, p["rejected"]))
            for p in pairs[:3]]  # the last pair is a gold tie: skipped
    assert sandbox.rm_gold_agreement(w.rm_dir, pairs) == {"agreement": pytest.approx(sum(want) / 3), "n": 3}
    ids = torch.tensor([chat.encode_prompt(tok, msgs)])
    hf_lm = AutoModelForCausalLM.from_pretrained(str(w.policy_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(w.policy_dir)(ids), hf_lm(ids).logits, atol=1e-4, rtol=1e-4)
    assert chat.stop_ids(tok, w.policy_dir) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]


# ---- gold metrics


def test_gold_metrics_on_hand_made_rows():
    msgs = [{"role": "user", "content": P}]
    new = [{"prompt_id": "a", "prompt": msgs, "responses": ["1 3 7 9", "1 3 9"]}]
    old = [{"prompt_id": "a", "prompt": msgs, "responses": ["1 3 9", "1 3 9"]}]
    assert sandbox.policy_gold(new) == pytest.approx((1 + 0.75) / 2)
    assert sandbox.policy_gold(new, perfect=True) == 0.5
    wr = sandbox.gold_win_rate(new, old)
    assert (wr["win"], wr["tie"], wr["win_rate"]) == (0.5, 0.5, 0.75)
    pairs = sandbox.sample_pairs(new)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("1 3 7 9", "1 3 9")]
    flipped = [{**pairs[0], "chosen": "1 3 9", "rejected": "1 3 7 9"}]
    tie = [{**pairs[0], "chosen": "1 3 9", "rejected": "1 3 9"}]
    assert sandbox.pair_gold_accuracy(pairs + flipped + tie) == {"accuracy": 0.5, "ties": pytest.approx(1 / 3), "n": 3}


# ---- the shift: a fixed r0 judges the drifting policy worse and worse (the paper's problem)

SHIFT_SEEDS = (0, 1, 2)
# the first sandbox's E-step (10 steps of 32 pairs at lr 3e-4, 16 new tokens, |D_MS| = 100): the shape
# in which DPO against the exploit world's r0 finds its blind spot
EXPLOIT_SHAPE = {"sampling.max_new_tokens": 16, "dpo.batch_size": 32, "dpo.micro_batch_size": 32,
                 "dpo.lr": 3e-4, "em.d_ms_size": 100}


def _fixed_rm_run(world, out: Path, seed: int) -> list[Path]:
    """Iterative DPO against the FIXED r0 for 2 iterations (the E-step of run_em, no M-step), with the
    sandbox preset on D_1 and D_2; returns [π0, π1, π2] and the D_MS prompts to measure on."""
    prompts = read_prompts(world.prompts_path)
    preset = {**C.PRESETS["sandbox"], **EXPLOIT_SHAPE}
    parts = em.partition([p["prompt_id"] for p in prompts], 2, C.EMConfig().rm_fraction, preset["em.d_ms_size"], seed)
    by_id = {p["prompt_id"]: p for p in prompts}
    policies = [world.policy_dir]
    for t in (1, 2):
        d = out / f"iter{t}"
        write_jsonl(d / "prompts.jsonl", [by_id[i] for i in parts[f"D_{t}"]])
        cfg = C.StageConfig(policy=str(policies[-1]), rm=str(world.rm_dir), prompts=str(d / "prompts.jsonl"),
                            out=str(d), seed=seed, device="cpu")
        for k, v in preset.items():
            flags.set_key(cfg, k, v)
        cfg.dpo.save_every = 0
        train_policy.main(cfg)
        policies.append(d / "policy" / "final")
    return policies, [by_id[i] for i in parts["D_MS"]]


def test_fixed_rm_agrees_less_with_gold_after_two_iterations(tmp_path):
    """Averaged over seeds, r0 orders pairs of π2's samples (π2: 2 iterations of DPO against the fixed r0)
    as gold does less often than pairs of π0's own samples -- by a gap far beyond sampling noise.

    The exploit world (r0 trained on π0's samples only), in the first sandbox's E-step shape (EXPLOIT_SHAPE;
    39 steps per iteration on its 1,300-prompt partitions). Measured (seeds 0, 1, 2; 4 samples on each of
    the 100 D_MS prompts; agreement over the pairs gold orders):
      r0 agreement on π0 pairs  0.959 0.946 0.953   mean 0.953
      r0 agreement on π2 pairs  0.699 0.626 0.590   mean 0.638
      policy gold π0 -> π2      0.915 -> 0.339, 0.908 -> 0.285, 0.901 -> 0.297
    π2 pads its answers with repeats, which r0 (trained where longer meant more complete) overrates.
    Runtime: 11 min here with a cold cache and two other jobs on the 2 cores (3 world builds), ≈1 min warm.
    """
    from mt.checkpoint import load_model
    from mt.sampler import SamplingConfig, sample
    scfg = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=16, slots=256, max_prompt_tokens=64)
    base, drifted, golds = [], [], []
    for seed in SHIFT_SEEDS:
        torch.manual_seed(seed)
        world = sandbox.build_world(seed, world="exploit")
        (pi0, _, pi2), d_ms = _fixed_rm_run(world, tmp_path / f"seed{seed}", seed)
        tok = chat.load_tokenizer(world.policy_dir)
        rows = {name: sample(load_model(p).eval(), tok, d_ms, scfg, seed=seed, stream=f"shift/{name}", n=4)
                for name, p in (("pi0", pi0), ("pi2", pi2))}
        base.append(sandbox.rm_gold_agreement(world.rm_dir, sandbox.sample_pairs(rows["pi0"]))["agreement"])
        drifted.append(sandbox.rm_gold_agreement(world.rm_dir, sandbox.sample_pairs(rows["pi2"]))["agreement"])
        golds.append((sandbox.policy_gold(rows["pi0"]), sandbox.policy_gold(rows["pi2"])))
    print(f"r0 agreement with gold: π0 pairs {base}, π2 pairs {drifted}; gold (π0, π2) {golds}")
    # the standard error of one agreement (400-900 pairs) is about 0.02; the measured gap is 0.48
    assert sum(drifted) / len(drifted) < sum(base) / len(base) - 0.1


def test_report_seed_ranges_and_paired_intervals_by_hand():
    from eval import sandbox_report as r
    assert r.parse_seeds("0-4,10") == [0, 1, 2, 3, 4, 10]
    # mean 0.15, sd 0.05 over 3 seeds: half-width t(0.975, 2) · sd / sqrt(3) = 4.303 · 0.05 / 1.732
    assert r.paired([0.1, 0.2, 0.15]) == "+0.150 [+0.026, +0.274]"
    assert r.paired([0.05]) == "+0.050 (1 seed)" and r.paired([]) == "-"
    with pytest.raises(flags.ConfigError, match="--seeds 'a-b'"):
        r.parse_seeds("a-b")


# ---- world v2 (general) and the exploit regime; the oracle calibration


def test_general_r0_is_trained_on_the_mixture_and_exploit_r0_on_pi0_alone(tmp_path):
    import json
    general = sandbox.build_world(seed=5, cache_dir=tmp_path, **SMALL)
    exploit = sandbox.build_world(seed=5, cache_dir=tmp_path, world="exploit", **SMALL)
    assert general.root != exploit.root
    by_source = general.info["rm_pairs_by_source"]
    assert len(by_source) >= 6 and "pi0" in by_source  # π0 one source among many
    assert set(exploit.info["rm_pairs_by_source"]) == {"pi0"}
    pairs = [json.loads(x) for x in open(general.rm_pairs_path)]
    assert all(gold_reward(p["prompt"], p["chosen"]) != gold_reward(p["prompt"], p["rejected"]) for p in pairs)
    # both report r0's gold agreement on every generator's pairs and on π0's
    for w in (general, exploit):
        assert set(w.info["rm_agreement"]) == {"pi0", "mixture", *sandbox.GENERATORS}
    # the exploit world keeps the first task: lists of 3-8 without separators
    lens = {len(sandbox.parse_numbers(json.loads(x)["prompt"])) for x in open(exploit.prompts_path)}
    assert min(lens) == 3 and exploit.config.separators == 0.0
    assert sandbox.render([1, 3, 7, 9], random.Random(0), 0.0) == "1 3 7 9"  # demonstrations without them


def test_separators_between_numbers_are_style_elsewhere_junk():
    assert gold_reward(P, "1 , 3 7 , 9") == gold_reward(P, "1 3 7 9") == 1.0
    assert gold_reward(P, ", 1 3 7 9") == pytest.approx(4 / 5)  # leading: a junk token
    assert gold_reward(P, "1 , , 3 7 9") == pytest.approx(4 / 6)  # doubled: both count
    rng = random.Random(0)
    forms = {sandbox.render([1, 3, 7, 9], rng, 0.5) for _ in range(200)}
    assert len(forms) == 8 and all(gold_reward(P, f) == 1.0 for f in forms)  # 2^3 surface forms
    for name in sandbox.GENERATORS:  # every generator answers in the task's vocabulary
        y = sandbox.generate(name, [7, 3, 9, 1], random.Random(1), 0.5)
        assert y and all(t in sandbox.WORDS or t.isdigit() for t in y.split())


def test_oracle_calibration_is_reproducible_and_follows_its_rule(tmp_path):
    from eval.sandbox_calibrate import CalibrateConfig, calibrate, choose_lr
    assert choose_lr({1e-5: [0.9, 0.91, 0.92], 2e-5: [0.9, 0.95, 0.94], 5e-6: [0.9, 0.9, 0.95]}) == 1e-5
    assert choose_lr({1e-4: [0.9, 0.8]}) is None
    run = ["--em.d_ms_size", "8", "--dpo.save_every", "1"]
    results = []
    for name in ("a", "b"):
        a = CalibrateConfig(seed=5, grid="1e-4,3e-3", n=2, every=1, out=str(tmp_path / name))
        results.append(calibrate(a, world_overrides=SMALL, run_overrides=run))
    assert results[0]["grid"] == results[1]["grid"] and results[0]["chosen_lr"] == results[1]["chosen_lr"]
    # the rule tests π0 and every checkpoint `every` steps apart, not the final one
    golds = {float(lr): [p["gold"] for p in pts if p["checkpoint"] != "final"]
             for lr, pts in results[0]["grid"].items()}
    assert len(golds[1e-4]) >= 2 and results[0]["chosen_lr"] == choose_lr(golds)
    assert results[0]["rises_at_every_checkpoint"] == {f"{lr:g}": choose_lr({lr: g}) == lr
                                                       for lr, g in golds.items()}
