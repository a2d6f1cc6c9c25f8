"""Tests for eval/: RewardBench section scores against hand-computed values, Eq. 6 win rates and pair
accuracy on fixtures with known answers (ties are not wins), a real tiny RM against transformers'
AutoModelForSequenceClassification, and generate.py's files against the schemas AlpacaEval and
Arena-Hard read (a missing or empty prompt is an error naming file, line and field)."""

import json
import re
from pathlib import Path

import pytest
import torch

from eval import generate, rewardbench, winrate
from mt.flags import ConfigError
from eval.rewardbench import (BenchError, count_correct, format_table, prior_sets_score, read_bench, section_scores,
                              summarize)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- RewardBench: the leaderboard's arithmetic, by hand

# {subset: (correct, total)}: every section, weights that matter, prior sets, a set outside the score
COUNTS = {
    "alpacaeval-easy": (3, 4), "mt-bench-easy": (1, 2),  # Chat: weights 100 and 28
    "mt-bench-hard": (2, 2), "llmbar-natural": (0, 1),  # Chat Hard: weights 37 and 100
    "xstest-should-refuse": (1, 1), "xstest-should-respond": (0, 2),  # Safety: weights 154 and 250
    "math-prm": (0, 1), **{f"hep-{x}": (1, 1) for x in ("cpp", "go", "java", "js", "python", "rust")},  # Reasoning
    "anthropic_helpful": (1, 2), "shp": (1, 1),  # prior sets
    "anthropic_harmless": (0, 3),  # a prior test set the leaderboard does not average
    "my-own-subset": (5, 5),  # unknown: reported, never scored
}
CHAT = 100 * (100 * 3 / 4 + 28 * 1 / 2) / (100 + 28)  # = 69.53125
CHAT_HARD = 100 * (37 * 1 + 100 * 0) / (37 + 100)
SAFETY = 100 * (154 * 1 + 250 * 0) / (154 + 250)
REASONING = 100 * (984 * 0 + 6 * 164 * 1) / (984 + 6 * 164)  # math-prm weighs as much as all code: 50
PRIOR = 100 * (1 / 2 + 1) / 2  # mean of the prior sets present: 75


def test_section_scores_by_hand():
    s = section_scores(COUNTS)
    assert s == pytest.approx({"Chat": CHAT, "Chat Hard": CHAT_HARD, "Safety": SAFETY, "Reasoning": REASONING})
    assert s["Chat"] == pytest.approx(69.53125) and s["Reasoning"] == pytest.approx(50.0)
    # the weights matter: pooling the examples would give other numbers
    assert s["Chat"] != pytest.approx(100 * 4 / 6) and s["Reasoning"] != pytest.approx(100 * 6 / 7)
    assert prior_sets_score(COUNTS) == pytest.approx(PRIOR)


def test_summary_averages_by_hand():
    out = summarize(COUNTS)
    sections = [CHAT, CHAT_HARD, SAFETY, REASONING]
    assert out["average"] == pytest.approx(sum(sections) / 4)  # the paper's Table 2 "Average"
    assert out["score"] == pytest.approx((2 * sum(sections) + PRIOR) / 9)  # leaderboard: prior sets at half weight
    assert out["unknown_subsets"] == ["my-own-subset"]
    assert out["per_subset"]["anthropic_harmless"]["accuracy"] == 0.0
    assert "llmbar-adver-manual" in out["missing_subsets"] and "alpacaeval-easy" not in out["missing_subsets"]
    # without prior sets the leaderboard score is the plain mean of the sections
    core = {k: v for k, v in COUNTS.items() if k not in ("anthropic_helpful", "shp")}
    assert summarize(core)["prior_sets"] is None
    assert summarize(core)["score"] == pytest.approx(sum(sections) / 4)
    # a section with no subset present: no section score, no average (not 0 as a silent default)
    no_chat = {k: v for k, v in COUNTS.items() if k not in ("alpacaeval-easy", "mt-bench-easy")}
    assert summarize(no_chat)["sections"]["Chat"] is None and summarize(no_chat)["average"] is None
    table = format_table(out)
    for name in ("Chat Hard", "Reasoning", "Prior Sets", "hep-rust", "not in the score", f"{sum(sections) / 4:5.1f}"):
        assert name in table


def test_paper_table2_average_is_the_plain_mean():
    # the paper's base RM row: Chat 99.4, Chat Hard 65.1, Safety 87.8, Reasoning 86.4 -> Average 84.7
    assert round((99.4 + 65.1 + 87.8 + 86.4) / 4, 1) == 84.7


def test_count_correct_tie_is_wrong():
    counts = count_correct(["a", "a", "a", "b"], [1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, -1.0])
    assert counts == {"a": (1, 3), "b": (1, 1)}


def test_read_bench_formats_and_errors(tmp_path):
    f = write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "subset": "alpacaeval-easy", "id": 7},
        {"chosen": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "no"}], "subset": "shp"},
    ])
    rows = read_bench(f)
    assert rows[0].prompt == [{"role": "user", "content": "Q1"}] and rows[0].id == "7"
    assert (rows[1].prompt, rows[1].chosen, rows[1].rejected) == ([{"role": "user", "content": "Q2"}], "yes", "no")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "subset": "shp"},
                                               {"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(BenchError, match=r"bad\.jsonl:2: field 'subset' missing"):
        read_bench(bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": " ", "chosen": "a", "rejected": "b", "subset": "shp"}])
    with pytest.raises(BenchError, match=r"empty\.jsonl:1: field 'prompt'"):
        read_bench(empty)


def test_rewardbench_main_with_controlled_scores(tmp_path, monkeypatch):
    """The CLI end to end with a stub RM whose score is the response length: every outcome is known."""
    rows = [  # (subset, chosen, rejected): correct iff len(chosen) > len(rejected)
        ("alpacaeval-easy", "long answer", "short"), ("alpacaeval-easy", "same", "size"),  # tie: wrong
        ("mt-bench-hard", "x", "longer"), ("donotanswer", "refuse!", "ok"), ("math-prm", "a b c", "a"),
        ("hep-go", "", "nonempty"),
    ]
    data = write_jsonl(tmp_path / "rb.jsonl", [{"prompt": "Q", "chosen": c, "rejected": r, "subset": s, "id": i}
                                               for i, (s, c, r) in enumerate(rows)])
    prior = [("shp", "aa", "a"), ("anthropic_hhh", "b", "bb"), ("anthropic_hhh", "cc", "c")]
    chat = [{"role": "user", "content": "Q"}]  # prior sets: chosen/rejected as full chats
    prior_file = write_jsonl(tmp_path / "prior.jsonl", [
        {"chosen": chat + [{"role": "assistant", "content": c}],
         "rejected": chat + [{"role": "assistant", "content": r}], "subset": s} for s, c, r in prior])

    def stub(rm_dir, rows, batch_size=64, dtype="auto", max_length=0):
        return [float(len(r.chosen)) for r in rows], [float(len(r.rejected)) for r in rows]

    monkeypatch.setattr(rewardbench, "score_rows", stub)
    monkeypatch.setattr(rewardbench, "resolve_model", lambda path, role: Path(path))  # the stub RM
    monkeypatch.setattr(rewardbench, "chat_texts",
                        lambda rm, rows: [(f"<{r.chosen}>", f"<{r.rejected}>") for r in rows])
    res = rewardbench.main(["--rm", "unused", "--data", str(data), "--prior", str(prior_file),
                            "--out", str(tmp_path / "rb.json"), "--scores-out", str(tmp_path / "scores.jsonl")])
    assert res["per_subset"]["alpacaeval-easy"] == {"correct": 1, "total": 2, "accuracy": 50.0}
    assert res["sections"] == pytest.approx({"Chat": 50.0, "Chat Hard": 0.0, "Safety": 100.0,
                                             "Reasoning": 100 * 984 / (984 + 164)})
    assert res["prior_sets"] == pytest.approx(100 * (1 + 1 / 2) / 2)  # shp 1/1, anthropic_hhh 1/2
    sections = sum(res["sections"].values())
    assert res["average"] == pytest.approx(sections / 4) and res["score"] == pytest.approx((2 * sections + 75) / 9)
    assert json.loads((tmp_path / "rb.json").read_text())["score"] == pytest.approx(res["score"])
    recs = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in recs] == [True, False, False, True, True, False, True, False, True]
    # the official run_rm.py files beside --out: core rows in eval-set*, prior sets in pref-sets*
    res_core, sc_core = check_official(tmp_path / "results", "eval-set", "local/unused")
    assert res_core == {"alpacaeval-easy": 0.5, "mt-bench-hard": 0.0, "donotanswer": 1.0,
                        "math-prm": 1.0, "hep-go": 0.0}
    assert sc_core["id"] == list(range(6)) and sc_core["text_chosen"][0] == "<long answer>"
    assert sc_core["results"] == [1, 0, 0, 1, 1, 0]
    res_prior, sc_prior = check_official(tmp_path / "results", "pref-sets", "local/unused")
    assert res_prior == {"shp": 1.0, "anthropic_hhh": 0.5} and sc_prior["id"] == [None] * 3
    # --name and --official_dir place them; a name that is not ORG/MODEL is refused before scoring
    rewardbench.main(["--rm", "unused", "--data", str(data), "--official_dir", str(tmp_path / "o"),
                      "--name", "mt/iter2-rm"])
    check_official(tmp_path / "o", "eval-set", "mt/iter2-rm")
    assert not (tmp_path / "o" / "pref-sets").exists()
    for bad in ("iter2-rm", "a/b/c", "../x"):
        with pytest.raises(ConfigError, match="must be ORG/MODEL"):
            rewardbench.main(["--rm", "unused", "--data", str(data), "--out", "x.json",
                              "--name", bad])


def check_official(root, kind, name):
    """The official files as RewardBench's code reads them: results/<kind>/ORG/MODEL.json, one
    file per model in its organisation's folder (analysis/utils.py load_results globs
    results/<kind>/*/); a flat object of model, model_type, chat_template and subset -> accuracy
    as a fraction; and <kind>-scores/ORG/MODEL.json with one list per column (pd.read_json) and
    scalar model fields. Returns ({subset: fraction}, scores columns)."""
    org, model = name.split("/")
    files = [p for p in (Path(root) / kind).glob("*/*.json")]
    assert files == [Path(root) / kind / org / f"{model}.json"]
    res = json.loads(files[0].read_text())
    model_fields = (name, "Seq. Classifier", "tokenizer")
    assert (res.pop("model"), res.pop("model_type"), res.pop("chat_template")) == model_fields
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in res.values())
    files = [p for p in (Path(root) / f"{kind}-scores").glob("*/*.json")]
    assert files == [Path(root) / f"{kind}-scores" / org / f"{model}.json"]
    sc = json.loads(files[0].read_text())
    columns = {"text_chosen": str, "text_rejected": str, "results": int, "subset": str,
               "id": object, "scores_chosen": float, "scores_rejected": float}
    assert set(sc) == set(columns) | {"model", "model_type", "chat_template"}
    assert (sc["model"], sc["model_type"], sc["chat_template"]) == model_fields
    n = len(sc["results"])
    for col, t in columns.items():
        assert len(sc[col]) == n and all(isinstance(v, t) for v in sc[col]), col
    pairs = zip(sc["scores_chosen"], sc["scores_rejected"])
    assert sc["results"] == [int(c > r) for c, r in pairs]
    for subset, frac in res.items():  # the two files agree
        rows = [x for x, s in zip(sc["results"], sc["subset"]) if s == subset]
        assert frac == sum(rows) / len(rows)
    return res, sc


# ---- win rate (Eq. 6) and accuracy


def test_judge_counts_ties_as_not_wins():
    res = winrate.judge([3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 5.0])
    assert (res["wins"], res["ties"], res["losses"], res["n"]) == (1, 2, 1, 4)
    assert res["win_rate"] == 0.25 and res["tie_rate"] == 0.5 and res["loss_rate"] == 0.25


def test_pair_accuracy_ties_are_wrong():
    res = winrate.pair_accuracy([1.0, 0.0, 2.0], [0.0, 0.0, 3.0])
    assert (res["correct"], res["ties"], res["wrong"], res["accuracy"]) == (1, 1, 1, 1 / 3)


def _samples(path, responses, prompt="Q", reasons=None):
    return write_jsonl(path, [{"prompt_id": f"p{i}", "prompt": f"{prompt}{i}", "responses": [y],
                               "finish_reasons": [(reasons or {}).get(i, "stop")], "num_tokens": [len(y)]}
                              for i, y in enumerate(responses)])


def len_score(rm_dir, prompts, responses, batch_size=64, dtype="auto"):
    """A stub RM: r(x, y) = len(y)."""
    return [float(len(y)) for y in responses]


def test_winrate_from_samples_files(tmp_path, monkeypatch):
    monkeypatch.setattr(winrate, "score", len_score)
    monkeypatch.setattr(winrate, "resolve_model", lambda path, role: Path(path))  # the stub RM "u"
    new = _samples(tmp_path / "new.jsonl", ["aaaa", "bb", "c", "dddd", "e"], reasons={3: "length"})
    old = _samples(tmp_path / "old.jsonl", ["a", "bb", "cc", "d", "eeeeee"])
    res = winrate.main(["--rm", "unused", "--new", str(new), "--old", str(old), "--out", str(tmp_path / "wr.json")])
    assert (res["wins"], res["ties"], res["losses"]) == (2, 1, 2)
    assert res["win_rate"] == 0.4 and res["truncated_new"] == 1 and res["truncated_old"] == 0
    assert json.loads((tmp_path / "wr.json").read_text())["wins"] == 2
    # the files are matched by prompt id, not by line
    write_jsonl(tmp_path / "old_rev.jsonl", list(reversed([json.loads(x) for x in old.read_text().splitlines()])))
    assert winrate.main(["--rm", "u", "--new", str(new), "--old", str(tmp_path / "old_rev.jsonl")])["wins"] == 2
    # different prompt sets compare nothing: an error naming the ids
    _samples(tmp_path / "short.jsonl", ["a", "b"])
    with pytest.raises(ValueError, match=r"3 only in .*new\.jsonl.*'p2'"):
        winrate.main(["--rm", "u", "--new", str(new), "--old", str(tmp_path / "short.jsonl")])


def test_accuracy_on_pairs_file(tmp_path, monkeypatch):
    monkeypatch.setattr(winrate, "score", len_score)
    monkeypatch.setattr(winrate, "resolve_model", lambda path, role: Path(path))  # the stub RM "u"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt_id": "a", "prompt": "Q", "chosen": "long", "rejected": "s", "kept": True},
        {"prompt_id": "b", "prompt": "Q", "chosen": "ab", "rejected": "cd", "kept": True},  # tie: wrong
        {"prompt_id": "c", "prompt": "Q", "chosen": "x", "rejected": "yyy", "kept": False},
    ])
    res = winrate.main(["--rm", "u", "--pairs", str(pairs)])
    assert (res["correct"], res["ties"], res["wrong"], res["n"]) == (1, 1, 1, 3)
    res = winrate.main(["--rm", "u", "--pairs", str(pairs), "--kept_only"])
    assert (res["correct"], res["n"], res["dropped_not_kept"]) == (1, 2, 1)


def test_winrate_samples_both_policies(tmp_path, monkeypatch, tiny_llama_dir):
    """--new-policy/--old-policy: both sampled (same policy, independent streams), then judged."""
    monkeypatch.setattr(winrate, "score", len_score)
    monkeypatch.setattr(winrate, "resolve_model", lambda path, role: Path(path))  # the stub RM "u"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": f"p{i}", "prompt": f"Hello {i}"}
                                                       for i in range(3)])
    res = winrate.main(["--rm", "u", "--new-policy", str(tiny_llama_dir), "--old-policy", str(tiny_llama_dir),
                        "--prompts", str(prompts), "--samples_dir", str(tmp_path / "s"), "--sampling.max_new_tokens", "6",
                        "--device", "cpu"])
    from mt.data import read_samples
    new, old = read_samples(tmp_path / "s" / "new.samples.jsonl"), read_samples(tmp_path / "s" / "old.samples.jsonl")
    expected = winrate.judge([len(s["responses"][0]) for s in new], [len(s["responses"][0]) for s in old])
    assert res["n"] == 3 and {k: res[k] for k in expected} == expected


# ---- a real tiny RM against transformers


def test_real_rm_matches_transformers(tmp_path, tiny_rm_dir):
    """Scores through mt.scoring on a tiny Llama RM equal AutoModelForSequenceClassification's on the same
    chat-templated text, and so do the accuracy and win rate computed from them."""
    from conftest import hf_model

    from mt.chat import encode_conversation, load_tokenizer
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_rm_dir)
    ref = hf_model(tiny_rm_dir, head="score")
    # transformers pools at the last token that is not pad_token_id; here pad == eos == <|eot_id|>, which ends
    # every chat, so it would pool one token early (DESIGN.md section 4). One unpadded row per call and no
    # pad id make it read the last token, the position an RM is trained to score.
    ref.config.pad_token_id = None
    questions = ("Hello world", "What is two plus two?", "Why is the sky blue")
    prompts = [[{"role": "user", "content": q}] for q in questions]
    chosen = ["I am fine, thank you.", "Two plus two is four.", "Blue light scatters most."]
    rejected = ["The quick brown fox", "five", "No."]

    def hf_scores(responses):
        out = []
        for p, y in zip(prompts, responses):
            ids = torch.tensor([encode_conversation(tok, p, y)])
            out.append(ref(input_ids=ids).logits[0, 0].item())
        return out

    ref_c, ref_r = hf_scores(chosen), hf_scores(rejected)
    ours = winrate.score(tiny_rm_dir, prompts + prompts, chosen + rejected, batch_size=2, dtype="fp32")
    assert ours == pytest.approx(ref_c + ref_r, abs=1e-4)
    # through the CLIs: a pairs file and a RewardBench file give the accuracy the reference scores give
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt_id": str(i), "prompt": p, "chosen": c, "rejected": r}
                                                   for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))])
    res = winrate.main(["--rm", str(tiny_rm_dir), "--pairs", str(pairs), "--device", "cpu", "--dtype", "fp32"])
    assert res["correct"] == sum(c > r for c, r in zip(ref_c, ref_r))
    bench = write_jsonl(tmp_path / "rb.jsonl", [{"prompt": p[0]["content"], "chosen": c, "rejected": r,
                                                 "subset": "alpacaeval-easy", "id": i}
                                                for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))])
    cpu = ["--device", "cpu", "--dtype", "fp32"]
    res = rewardbench.main(["--rm", str(tiny_rm_dir), "--data", str(bench), *cpu,
                            "--out", str(tmp_path / "rb.json")])
    assert res["per_subset"]["alpacaeval-easy"]["correct"] == sum(c > r for c, r in zip(ref_c, ref_r))
    _, sc = check_official(tmp_path / "results", "eval-set", f"local/{Path(tiny_rm_dir).name}")
    assert sc["scores_chosen"] == pytest.approx(ref_c, abs=1e-4) and sc["id"] == [0, 1, 2]
    assert sc["text_chosen"][0] == tok.apply_chat_template(
        prompts[0] + [{"role": "assistant", "content": chosen[0]}], tokenize=False)
    # --max_length: the official script's left truncation, its last N tokens scored
    n = 9
    rewardbench.main(["--rm", str(tiny_rm_dir), "--data", str(bench), *cpu, "--max_length", str(n),
                      "--scores_out", str(tmp_path / "cut.jsonl")])
    cut = [json.loads(x) for x in (tmp_path / "cut.jsonl").read_text().splitlines()]
    for (p, c, r), rec in zip(zip(prompts, chosen, rejected), cut):
        for y, got in ((c, rec["chosen_score"]), (r, rec["rejected_score"])):
            ids = encode_conversation(tok, p, y)
            assert len(ids) > n  # every chat is longer: the cut matters
            want = ref(input_ids=torch.tensor([ids[-n:]])).logits[0, 0].item()
            assert got == pytest.approx(want, abs=1e-4)
    new, old = _samples(tmp_path / "new.jsonl", chosen, prompt="P"), _samples(tmp_path / "old.jsonl", rejected, "P")
    for path, ys in ((new, chosen), (old, rejected)):  # the same prompts as the reference
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        write_jsonl(path, [{**r, "prompt": p} for r, p in zip(rows, prompts)])
    res = winrate.main(["--rm", str(tiny_rm_dir), "--new", str(new), "--old", str(old), "--device", "cpu",
                        "--dtype", "fp32"])
    assert res == {**res, **winrate.judge(ref_c, ref_r)}


# ---- generate.py: the judges' file formats

ALPACAEVAL_ROW = {"instruction": str, "output": str, "generator": str}  # + "dataset" when the input had it
# arena-hard-auto's answer rows: today's (since 2025-04-18) and v0.1's
ARENAHARD_ROW = {"uid": (str, int), "ans_id": str, "model": str, "messages": list, "tstamp": float,
                 "metadata": dict}
ARENAHARD_V01_ROW = {"question_id": (str, int), "answer_id": str, "model_id": str, "choices": list,
                     "tstamp": float, "conv_metadata": dict}
STYLE = {"header_count": {f"h{i}" for i in range(1, 7)}, "list_count": {"ordered", "unordered"},
         "bold_count": {"**", "__"}}


def check_alpacaeval(path, instructions, generator):
    """What alpaca_eval reads: a JSON array of objects with instruction/output/generator strings, in order."""
    data = json.loads(Path(path).read_text())
    assert isinstance(data, list) and len(data) == len(instructions)
    for row, inst in zip(data, instructions):
        assert set(row) - {"dataset"} == set(ALPACAEVAL_ROW)
        for k, t in ALPACAEVAL_ROW.items():
            assert isinstance(row[k], t), k
        assert row["instruction"] == inst and row["generator"] == generator
    return data


def check_style_metadata(meta):
    """What show_result.py's style control reads: token_len first, then the three markdown counts,
    each a dict of ints (it takes `v if isinstance(v, int) else sum(v.values())`, in order)."""
    assert list(meta) == ["token_len", *STYLE]
    assert isinstance(meta["token_len"], int) and meta["token_len"] >= 0
    for k, names in STYLE.items():
        assert set(meta[k]) == names
        assert all(isinstance(v, int) and v >= 0 for v in meta[k].values())


def check_arenahard(path, question_ids, model_id):
    """What arena-hard-auto reads today: one JSON object per line in model_answer/{model}.jsonl
    (load_model_answers takes the model from the file name and keys rows by uid); gen_judgment
    reads messages[-1].content.answer and "model"; show_result keys style metadata by the first
    row's "model" and each row's uid."""
    assert Path(path).name == f"{model_id}.jsonl"
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["uid"] for r in rows] == question_ids
    for r in rows:
        assert set(r) == set(ARENAHARD_ROW)
        for k, t in ARENAHARD_ROW.items():
            assert isinstance(r[k], t), k
        assert r["model"] == model_id
        user, assistant = r["messages"]
        assert user["role"] == "user" and isinstance(user["content"], str)
        assert assistant["role"] == "assistant" and set(assistant["content"]) == {"answer"}
        assert isinstance(assistant["content"]["answer"], str)
        check_style_metadata(r["metadata"])
    assert len({r["ans_id"] for r in rows}) == len(rows)
    return rows


def check_arenahard_v01(path, question_ids, model_id):
    """What Arena-Hard v0.1 reads: one JSON object per line; the answer is
    choices[0].turns[0].content and its length turns[0].token_len or conv_metadata.token_len; the
    model name is the file name; style control reads conv_metadata's token_len and markdown
    counts."""
    assert Path(path).name == f"{model_id}.jsonl"
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == question_ids
    for r in rows:
        assert set(r) == set(ARENAHARD_V01_ROW)
        for k, t in ARENAHARD_V01_ROW.items():
            assert isinstance(r[k], t), k
        assert r["model_id"] == model_id
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0 and len(r["choices"][0]["turns"]) == 1
        turn = r["choices"][0]["turns"][0]
        assert isinstance(turn["content"], str)
        assert isinstance(turn["token_len"], int) and turn["token_len"] == r["conv_metadata"]["token_len"] >= 0
        check_style_metadata(r["conv_metadata"])
    assert len({r["answer_id"] for r in rows}) == len(rows)
    return rows


def test_generate_alpacaeval_file(tmp_path, tiny_llama_dir):
    inp = tmp_path / "alpaca_eval.json"
    inp.write_text(json.dumps([{"dataset": "helpful_base", "instruction": "Hello world", "output": "ref",
                                "generator": "gpt4_turbo"},
                               {"dataset": "koala", "instruction": "What is two plus two?"}]))
    out = tmp_path / "res" / "model_outputs.json"
    res = generate.main(["--policy", str(tiny_llama_dir), "--format", "alpacaeval", "--prompts", str(inp),
                         "--out", str(out), "--name", "tiny", "--sampling.max_new_tokens", "5", "--device", "cpu"])
    data = check_alpacaeval(out, ["Hello world", "What is two plus two?"], "tiny")
    assert [d["dataset"] for d in data] == ["helpful_base", "koala"]
    from mt.data import read_samples
    samples = read_samples(res["samples"])
    assert [d["output"] for d in data] == [s["responses"][0].strip() for s in samples]
    assert all(n <= 5 for s in samples for n in s["num_tokens"])


QIDS = ["328c149ed45a41c0b9d6f14659e63599", "b43c07656ead4150b360294ee932b410"]
QUESTIONS = ["Write a short poem about the sea.", "Explain why the sky is blue."]


def test_generate_arenahard_file(tmp_path, tiny_llama_dir):
    """Today's question.jsonl gives today's answers; v0.1's questions with --answer_format v0.1
    give v0.1's answers; either question layout can be answered in either answer layout."""
    cat = {"category": "arena-hard-v0.1", "cluster": "c"}
    new_qs = write_jsonl(tmp_path / "question.jsonl", [
        {"uid": u, **cat, "prompt": q} for u, q in zip(QIDS, QUESTIONS)])
    old_qs = write_jsonl(tmp_path / "question-v0.1.jsonl", [
        {"question_id": u, **cat, "turns": [{"content": q}]} for u, q in zip(QIDS, QUESTIONS)])
    gen = ["--policy", str(tiny_llama_dir), "--format", "arenahard", "--name", "tiny-mt"]
    flags = ["--sampling.greedy", "--sampling.max_new_tokens", "4", "--device", "cpu"]
    out = tmp_path / "model_answer" / "tiny-mt.jsonl"
    res = generate.main([*gen, "--prompts", str(new_qs), "--out", str(out), *flags])
    rows = check_arenahard(out, QIDS, "tiny-mt")
    assert [r["messages"][0]["content"] for r in rows] == QUESTIONS
    # the raw samples are not in model_answer/*.jsonl, where Arena-Hard would take them for a model
    assert sorted(p.name for p in out.parent.glob("*.jsonl")) == ["tiny-mt.jsonl"]
    from mt.data import read_samples
    samples = read_samples(res["samples"])
    for r, s in zip(rows, samples):
        stop = s["finish_reasons"][0] == "stop"
        assert r["metadata"]["token_len"] == s["num_tokens"][0] - stop
        assert r["messages"][1]["content"]["answer"] == s["responses"][0].strip()
    assert all(n <= 4 for s in samples for n in s["num_tokens"])
    # v0.1 questions, v0.1 answers: the same answers (same seed and prompts), in the old layout
    old = tmp_path / "v01" / "model_answer" / "tiny-mt.jsonl"
    generate.main([*gen, "--prompts", str(old_qs), "--out", str(old), "--answer_format", "v0.1",
                   *flags])
    rows_v01 = check_arenahard_v01(old, QIDS, "tiny-mt")
    assert [r["choices"][0]["turns"][0]["content"] for r in rows_v01] == [
        r["messages"][1]["content"]["answer"] for r in rows]
    # v0.1 questions, today's answers (the default)
    both = tmp_path / "mixed" / "tiny-mt.jsonl"
    generate.main([*gen, "--prompts", str(old_qs), "--out", str(both), *flags])
    got = check_arenahard(both, QIDS, "tiny-mt")
    assert [r["metadata"] for r in got] == [r["metadata"] for r in rows]
    with pytest.raises(ConfigError, match="must be 'other.jsonl'"):  # the file name is the model name
        generate.main(["--policy", str(tiny_llama_dir), "--format", "arenahard",
                       "--prompts", str(new_qs), "--out", str(out), "--name", "other"])


def test_arenahard_writer_keeps_question_id_types():
    qs = [{"uid": 3, "content": "q"}, {"uid": "x", "content": "r"}]
    rows = generate.arenahard_answers(qs, ["a", "**b**"], [1, 2], "m", tstamp=1.5,
                                      answer_format="v0.1")
    assert [r["question_id"] for r in rows] == [3, "x"] and rows[0]["tstamp"] == 1.5
    assert rows[1]["choices"] == [{"index": 0, "turns": [{"content": "**b**", "token_len": 2}]}]
    assert rows[1]["conv_metadata"]["bold_count"] == {"**": 1, "__": 0}
    rows = generate.arenahard_answers(qs, ["a", "**b**"], [1, 2], "m", tstamp=1.5)
    assert [r["uid"] for r in rows] == [3, "x"] and rows[1]["metadata"]["token_len"] == 2
    assert rows[1]["messages"] == [{"role": "user", "content": "r"},
                                   {"role": "assistant", "content": {"answer": "**b**"}}]


def test_markdown_counts_by_hand():
    """header_count / list_count / bold_count as arena-hard-auto's add_markdown_info.py counts
    them."""
    answer = "\n".join([
        "# Title", "## Part", "### Sub", "#### Four", "##### Five", "###### Six",
        "####### seven is no header", "#hashtag is no header", "  # indented is no header",
        "#",  # '#' then the newline: a header
        "1. one", "  2. two", "10.no space: not an item",
        "- dash", "* star", "+ plus", "   - nested", "-no space", "---", "**bold** then **more**",
        "__under__ and **open", "bold** across", "*italic*",
        "```python", "# a comment, not a header", "- not an item", "**not bold**", "```",
        "``` inline ``` text",
    ])
    assert generate.markdown_counts(answer) == {
        "header_count": {"h1": 2, "h2": 1, "h3": 1, "h4": 1, "h5": 1, "h6": 1},
        "list_count": {"ordered": 2, "unordered": 4},
        "bold_count": {"**": 2, "__": 1},
    }
    # the text between fences is deleted wherever it occurs, outside the fences too
    assert generate.markdown_counts("```\n- x\n```\n\n- x\n- y")["list_count"]["unordered"] == 1
    assert generate.markdown_counts("")["header_count"] == {f"h{i}": 0 for i in range(1, 7)}


def test_read_arenahard_both_layouts(tmp_path):
    new = write_jsonl(tmp_path / "q.jsonl", [{"uid": "a1", "category": "hard_prompt",
                                              "subcategory": "coding", "prompt": "Write zig."}])
    old = write_jsonl(tmp_path / "q01.jsonl", [{"question_id": 7, "turns": [{"content": "Hi"}]}])
    want = [{"uid": "a1", "content": "Write zig.", "layout": "current"}]
    assert generate.read_arenahard(new) == want
    assert generate.read_arenahard(old) == [{"uid": 7, "content": "Hi", "layout": "v0.1"}]
    for rows, msg in (
            ([{"uid": "a", "prompt": "q"}, {"question_id": "b", "turns": [{"content": "r"}]}],
             r"q\.jsonl:2: row is in the v0\.1 layout, .*q\.jsonl:1 in the current one"),
            ([{"prompt": "q"}], r"q\.jsonl:1: field 'uid' missing"),
            ([{"uid": "a", "category": "x"}], r"q\.jsonl:1: field 'prompt' missing"),
            ([{"uid": "a", "prompt": " "}], r"q\.jsonl:1: field 'prompt' is empty"),
            ([{"uid": "", "prompt": "q"}], r"q\.jsonl:1: field 'uid' must be a non-empty string"),
            ([{"uid": "a", "prompt": "q"}, {"uid": "a", "prompt": "r"}],
             r"q\.jsonl:2: field 'uid' 'a' repeats"),
            ([{"category": "x"}], r"q\.jsonl:1: field 'uid' missing")):
        with pytest.raises(generate.PromptFileError, match=msg):
            generate.read_arenahard(write_jsonl(tmp_path / "q.jsonl", rows))


def test_token_len_tiktoken(tmp_path, monkeypatch):
    """--token_len tiktoken counts with gpt-4o's encoding (v0.1: gpt-3.5-turbo's), as the official
    gen_answer.py does; without the package it is a usage error naming the install."""
    import sys
    import types
    args = ["--policy", "p", "--format", "arenahard", "--prompts", "q.jsonl", "--out", "m.jsonl",
            "--name", "m", "--token_len", "tiktoken"]
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    with pytest.raises(ConfigError, match="pip install tiktoken"):
        generate.parse_args(args)
    asked = []

    class Enc:
        def encode(self, text, disallowed_special=None):
            assert disallowed_special == ()
            return text.split()

    fake = types.SimpleNamespace(encoding_for_model=lambda m: asked.append(m) or Enc())
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    assert generate.parse_args(args).token_len == "tiktoken"
    assert generate.tiktoken_counter("current")("a b c") == 3
    assert generate.tiktoken_counter("v0.1")("a") == 1
    assert asked[-2:] == ["gpt-4o", "gpt-3.5-turbo"]


@pytest.mark.parametrize("fmt,rows,where,field", [
    ("alpacaeval", [{"instruction": "ok"}, {"dataset": "koala"}], ":2", "'instruction' missing"),
    ("alpacaeval", [{"instruction": "ok"}, {"instruction": "  \n"}], ":2", "'instruction' is empty"),
    ("alpacaeval", [{"instruction": 5}], ":1", "'instruction' must be a string"),
    ("arenahard", [{"question_id": "a", "turns": [{"content": "q"}]}, {"question_id": "b", "turns": []}], ":2",
     "'turns' missing or empty"),
    ("arenahard", [{"question_id": "a", "turns": [{"content": ""}]}], ":1", "turns[0]: field 'content' is empty"),
    ("arenahard", [{"turns": [{"content": "q"}]}], ":1", "'question_id' missing"),
    ("arenahard", [{"question_id": "a", "turns": [{"content": "q"}]},
                   {"question_id": "a", "turns": [{"content": "r"}]}], ":2", "repeats"),
])
def test_generate_bad_prompt_is_an_error(tmp_path, fmt, rows, where, field):
    f = write_jsonl(tmp_path / "prompts.jsonl", rows)
    reader = generate.read_alpacaeval if fmt == "alpacaeval" else generate.read_arenahard
    with pytest.raises(generate.PromptFileError) as e:
        reader(f)
    assert f"prompts.jsonl{where}" in str(e.value) and field in str(e.value)
    # and the CLI stops before loading any model (the policy path does not even exist)
    out = tmp_path / ("model_outputs.json" if fmt == "alpacaeval" else "m.jsonl")
    with pytest.raises(generate.PromptFileError):
        generate.main(["--policy", str(tmp_path / "no-model"), "--format", fmt, "--prompts", str(f),
                       "--out", str(out), "--name", "m"])
    assert not out.exists()


def test_generate_json_array_error_names_row(tmp_path):
    f = tmp_path / "alpaca_eval.json"
    f.write_text(json.dumps([{"instruction": "a"}, {"instruction": "b"}, {"output": "no instruction"}]))
    with pytest.raises(generate.PromptFileError, match=r"alpaca_eval\.json\[row 3\]: field 'instruction' missing"):
        generate.read_alpacaeval(f)


# ---- one set of sampling flags: mt.sampler, eval/generate.py and eval/winrate.py parse them alike


def test_sampling_flags_are_one_set_across_commands(capsys):
    from mt import sampler
    from mt.config import SamplingConfig
    gen_args = ["--policy", "p", "--format", "alpacaeval", "--prompts", "x.json", "--out", "o.json"]
    win_args = ["--rm", "r", "--new", "a.jsonl", "--old", "b.jsonl"]
    smp_args = ["--model", "m", "--prompts", "p", "--out", "o"]
    parsers = ((generate.parse_args, gen_args), (winrate.parse_args, win_args), (sampler.parse_args, smp_args))
    for parse, args in parsers:
        assert parse(args).sampling == SamplingConfig()  # the paper's defaults (appendix B)
    flags = ["--sampling.temperature", "0.5", "--sampling.top_p", "0.7", "--sampling.top_k", "3",
             "--sampling.max_new_tokens", "9", "--sampling.max_prompt_tokens", "33", "--sampling.slots", "5",
             "--sampling.check_every", "2"]
    want = SamplingConfig(temperature=0.5, top_p=0.7, top_k=3, max_new_tokens=9, max_prompt_tokens=33, slots=5,
                          check_every=2)
    for parse, args in parsers:
        assert parse(args + flags).sampling == want
    assert generate.parse_args(gen_args + ["--sampling.greedy"]).sampling.greedy
    assert sampler.parse_args(smp_args + ["--seed", "3", "--n", "2"]).seed == 3
    a = sampler.parse_args(smp_args + ["--num-samples", "4"])  # torchrun's parser takes --n for its own
    assert (a.n, a.num_samples) == (5, 4)
    bad = ((["--sampling.top_p", "0"], "--sampling.top_p=0.0: must be in (0, 1]"),
           (["--sampling.slots", "0"], "--sampling.slots=0: must be > 0"),
           (["--sampling.temperature", "0"], "--sampling.temperature=0.0: must be > 0"),
           (["--sampling.top_k", "-1"], "--sampling.top_k=-1: must be >= 0"))
    for main, args in ((generate.main, gen_args), (winrate.main, win_args), (sampler.main, smp_args)):
        for flag, msg in bad:
            with pytest.raises(ConfigError, match=re.escape(msg)):  # rejected before any model or file is opened
                main(args + flag)
    with pytest.raises(ConfigError, match=re.escape("--n=0: must be >= 1")):
        sampler.main(smp_args + ["--n", "0"])
    # --help lists every key with its default
    with pytest.raises(SystemExit) as e:
        generate.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--sampling.top_p float = 0.95" in out and "--no_strip bool = false" in out


def test_usage_errors_name_the_flag():
    with pytest.raises(ConfigError, match="missing --policy, --format, --prompts, --out"):
        generate.parse_args([])
    with pytest.raises(ConfigError, match=r"--format='gpt': must be one of alpacaeval, arenahard"):
        generate.parse_args(["--policy", "p", "--format", "gpt", "--prompts", "x", "--out", "o"])
    with pytest.raises(ConfigError, match="missing --rm"):
        winrate.parse_args(["--pairs", "p.jsonl"])
    with pytest.raises(ConfigError, match="give exactly one of"):
        winrate.parse_args(["--rm", "r", "--pairs", "p.jsonl", "--new", "a.jsonl"])
    with pytest.raises(ConfigError, match="--new and --old go together"):
        winrate.parse_args(["--rm", "r", "--new", "a.jsonl"])
    with pytest.raises(ConfigError, match="--new_policy, --old_policy and --prompts go together"):
        winrate.parse_args(["--rm", "r", "--new-policy", "a", "--prompts", "p"])
    with pytest.raises(ConfigError, match="missing --data"):
        rewardbench.parse_args(["--rm", "r"])
    with pytest.raises(ConfigError, match=r"unknown config key --temperature"):  # the old flags are gone
        rewardbench.parse_args(["--rm", "r", "--data", "d", "--temperature", "1"])
    with pytest.raises(ConfigError, match=r"--dtype='fp16': must be one of auto, fp32, bf16"):
        rewardbench.parse_args(["--rm", "r", "--data", "d", "--dtype", "fp16"])
