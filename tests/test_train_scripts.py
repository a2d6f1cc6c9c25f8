"""train_policy.py and train_rm.py as a user runs them: the whole E-step on tiny checkpoints (files of
DESIGN.md §2, a rerun that skips finished work), offline preference baselines from a pairs file, the M-step CLI."""
import json

import pytest
from transformers import AutoModelForSequenceClassification

import train_policy
import train_rm
from mt import config as C
from mt import flags
from mt.checkpoint import load_model, read_config
from mt.data import read_pairs, read_samples, read_scores, write_jsonl

QUESTIONS = ["What is two plus two?", "Write a short poem about the sea.", "Explain why the sky is blue",
             "Hello world, how are you today?", "What does the quick brown fox do?", "Is the sea wide?"]



def _pairs(path):
    rows = [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}], "chosen": f"{q} Yes, fine.",
             "rejected": "no"} for i, q in enumerate(QUESTIONS)]
    write_jsonl(path, rows)
    return path


def test_e_step_end_to_end_and_rerun_skips(tiny_llama_dir, tiny_rm_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    argv = ["--preset", "tiny", "--policy", str(tiny_llama_dir), "--rm", str(tiny_rm_dir),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "e"), "--device", "cpu",
            "--em.keep_truncated", "true",  # a random tiny policy rarely stops within 8 tokens
            "--dpo.batch_size", "2", "--dpo.micro_batch_size", "1", "--dpo.save_every", "2"]
    cfg = C.parse(argv, C.StageConfig())
    assert cfg.pairs == "" and cfg.dpo.beta == 0.1
    info = train_policy.main(cfg)
    e = tmp_path / "e"
    samples, scores = read_samples(e / "samples.jsonl"), read_scores(e / "scores.jsonl")
    assert [s["prompt_id"] for s in samples] == [f"q{i}" for i in range(6)]
    assert all(len(s["responses"]) == 3 for s in samples)
    assert [len(s["scores"]) for s in scores] == [3] * 6
    pairs = read_pairs(e / "pairs.jsonl")
    stats = json.loads((e / "pairs.stats.json").read_text())
    assert stats["pairs"] == len(pairs) == info["pairs"] > 0
    refs = [json.loads(x) for x in (e / "ref_logps.jsonl").read_text().splitlines()]
    assert len(refs) == len(pairs) and all(r["ref_chosen_logps"] < 0 for r in refs)
    steps = -(-len(pairs) // 2)
    assert info["steps"] == steps and 0 <= info["reward_acc"] <= 1
    ckpts = train_policy.checkpoints(e / "policy")
    assert ckpts == [f"ckpt-{s}" for s in range(2, steps, 2)] + ["final"]
    for k in ckpts:  # every candidate is a loadable policy with its tokenizer and generation config
        load_model(e / "policy" / k)
        assert (e / "policy" / k / "tokenizer_config.json").is_file()
    assert json.loads((e / "config.json").read_text())["dpo"]["batch_size"] == 2
    # a rerun: every step is recorded done in e/manifest.json (mt/manifest.py, as run_em.py); nothing is redone
    mtime = (e / "policy" / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert train_policy.main(cfg)["steps"] == steps
    out = capsys.readouterr().out
    assert out.count("[done]") == 5 and "[run]" not in out
    assert (e / "policy" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    # a rerun with a changed flag into the same --out is refused, naming the differing key; nothing is touched
    before = (e / "manifest.json").read_bytes(), (e / "config.json").read_bytes()
    with pytest.raises(flags.ConfigError, match=r'em.pair_rule: "length_control" -> "max_min"(.|\n)*--force_config'):
        train_policy.main(C.parse(argv + ["--em.pair_rule", "max_min"], C.StageConfig()))
    assert ((e / "manifest.json").read_bytes(), (e / "config.json").read_bytes()) == before
    # with --force_config the pairs are rebuilt and everything downstream redone; sampling and scoring kept
    capsys.readouterr()
    old_pairs = (e / "pairs.jsonl").read_bytes()
    train_policy.main(C.parse(argv + ["--em.pair_rule", "max_min", "--force_config"], C.StageConfig()))
    out = capsys.readouterr().out
    assert "[done] sample" in out and "[done] score" in out and "[run]  pairs" in out
    # downstream stages are redone exactly when their input, the pairs file, changed
    assert ("[run]  dpo" in out) == ((e / "pairs.jsonl").read_bytes() != old_pairs)
    assert json.loads((e / "config.json").read_text())["em"]["pair_rule"] == "max_min"


@pytest.mark.parametrize("loss, extra", [("simpo", []), ("ipo", []), ("cdpo", ["--dpo.label_smoothing", "0.1"])])
def test_offline_baselines_from_a_pairs_file(tiny_llama_dir, tmp_path, loss, extra):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    cfg = C.parse(
        ["--preset", "tiny", "--policy", str(tiny_llama_dir), f"--pairs={pairs}", "--out", str(tmp_path / "o"),
         "--dpo.loss", loss, "--dpo.batch_size", "2", "--dpo.micro_batch_size", "2", "--device", "cpu", *extra],
        C.StageConfig())
    assert cfg.pairs == str(pairs)
    info = train_policy.main(cfg)
    assert info["pairs"] == 6 and info["steps"] == 3
    refs = (tmp_path / "o" / "ref_logps.jsonl").read_text().splitlines()
    assert len(refs) == (0 if loss == "simpo" else 6)  # SimPO needs no reference model
    assert (tmp_path / "o" / "policy" / "final" / "config.json").is_file()


def test_train_rm_cli_on_two_files_from_a_causal_lm(tiny_llama_dir, tmp_path):
    a, b = _pairs(tmp_path / "a.jsonl"), tmp_path / "b.jsonl"
    write_jsonl(b, [{"prompt_id": "z", "prompt": "Is it blue?", "chosen": "Yes, it is blue.", "rejected": "no"}])
    cfg = C.parse(["--preset", "tiny", "--rm", str(tiny_llama_dir), "--pairs", f"{a},{b}",
                   "--out", str(tmp_path / "rm"), "--rm_train.max_length", "40", "--device", "cpu"], C.StageConfig())
    assert cfg.pairs == f"{a},{b}" and cfg.rm_train.batch_size == 4
    info = train_rm.main(cfg)
    assert info["pairs"] == 7 and info["steps"] == -(-(7 - info["dropped_too_long"]) // 4)
    assert read_config(tmp_path / "rm" / "final").head == "score"  # OUT/final is the RM, as policy/final
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm" / "final"))
    assert hf.config.num_labels == 1 and hf.config.pad_token_id is not None
    assert 0 <= train_rm.pair_accuracy(tmp_path / "rm" / "final", a) <= 1
    with pytest.raises(flags.ConfigError, match="--pairs"):
        train_rm.main(C.parse(["--rm", str(tiny_llama_dir), "--out", str(tmp_path / "x")], C.StageConfig()))
