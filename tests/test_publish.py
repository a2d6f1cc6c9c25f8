"""The selected models of a run (mt/runs.py), the export for the Hub (eval/export.py), Tables 1 and 2
(eval/tables.py) and eval/generate.py's user errors.

The run directory here is laid out by hand as run_em.py writes it (summary.json, selection.json, ...),
so both spellings of summary.json's paths (absolute today, relative to the run next) are tested; the
README test (tests/test_readme_commands.py) runs the same commands on a real tiny run.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval import export, tables
from mt.flags import ConfigError
from mt.runs import ModelPathError, resolve_model

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, policy_src: Path, rm_src: Path, relative: bool = True, base_name: str = "base") -> Path:
    """A finished 1-iteration run: iter1/policy/{ckpt-1,ckpt-2,final} with ckpt-2 selected, iter1/rm/final."""
    base_p, base_r = root / f"{base_name}-policy", root / f"{base_name}-rm"
    shutil.copytree(policy_src, base_p)
    shutil.copytree(rm_src, base_r)
    run = root / "runs" / "mt"
    for k in ("ckpt-1", "ckpt-2", "final"):
        shutil.copytree(policy_src, run / "iter1" / "policy" / k)
    shutil.copytree(rm_src, run / "iter1" / "rm" / "final")
    it = run / "iter1"
    (it / "selection.json").write_text(json.dumps({
        "chosen": "ckpt-2", "best": "ckpt-2", "win_rate": 0.75, "stop": False, "tau": 0.6,
        "candidates": {"ckpt-1": {"win_rate": 0.5}, "ckpt-2": {"win_rate": 0.75}, "final": {"win_rate": 0.625}}}))
    (it / "pseudo_pairs.info.json").write_text(json.dumps({"eps_t": 1.25, "strategy": "lqf", "n": 10,
                                                          "kept": 9, "kept_total": 9}))
    (it / "rm_eval.json").write_text(json.dumps({"heldout_acc_new": 0.8125}))
    (run / "splits").mkdir()
    for name, n in (("D_1", 6), ("D_MS", 2), ("D_R", 3)):
        (run / "splits" / f"{name}.jsonl").write_text("".join(f'{{"prompt_id": "{i}"}}\n' for i in range(n)))
    cfg = {"policy": str(base_p), "rm": str(base_r), "prompts": "prompts.jsonl", "out": str(run), "iters": 1,
           "seed": 0, "preset": "paper", "em": {"rounds": 1, "tau": 0.6, "filter": "lqf"},
           "dpo": {"beta": 0.01, "lr": 5e-7}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "manifest.json").write_text("{}")
    pol, rm = Path("iter1/policy/ckpt-2"), Path("iter1/rm/final")
    if not relative:
        pol, rm = run / pol, run / rm
    (run / "summary.json").write_text(json.dumps({"policy": str(pol), "rm": str(rm), "iterations": []}))
    return run


@pytest.fixture
def run(tmp_path, tiny_checkpoint):
    return make_run(tmp_path, tiny_checkpoint("llama", "lm", 3), tiny_checkpoint("llama", "score", 4))


# ---- mt/runs.py


@pytest.mark.parametrize("relative", [True, False])
def test_a_run_directory_stands_for_its_selected_policy_and_final_rm(tmp_path, tiny_checkpoint, relative, capsys):
    run = make_run(tmp_path, tiny_checkpoint("llama", "lm", 3), tiny_checkpoint("llama", "score", 4), relative)
    assert resolve_model(run, "policy") == run / "iter1" / "policy" / "ckpt-2"
    assert f"{run}: the selected policy is {run / 'iter1/policy/ckpt-2'} (summary.json)" in capsys.readouterr().out
    assert resolve_model(run, "rm") == run / "iter1" / "rm" / "final"
    model = run / "iter1" / "policy" / "final"
    assert resolve_model(model, "policy") == model  # a model directory is itself


def test_a_moved_run_rebases_summary_paths(tmp_path, tiny_checkpoint):
    run = make_run(tmp_path, tiny_checkpoint("llama", "lm", 3), tiny_checkpoint("llama", "score", 4), False)
    moved = Path(shutil.move(str(run), str(tmp_path / "moved")))
    assert resolve_model(moved, "policy") == moved / "iter1" / "policy" / "ckpt-2"


def test_a_checkpoints_directory_is_refused_naming_the_selected_one(run):
    with pytest.raises(ModelPathError) as e:
        resolve_model(run / "iter1" / "policy", "policy")
    msg = str(e.value)
    assert "holds the checkpoints of one iteration" in msg and "selected one is" in msg
    assert f"{run / 'iter1/policy/ckpt-2'} (selection.json)" in msg
    assert f"Fix: pass the run directory {run.resolve()} or {run / 'iter1/policy/ckpt-2'}" in msg
    with pytest.raises(ModelPathError, match=r"selected one is .*iter1/rm/final"):
        resolve_model(run / "iter1" / "rm", "rm")


def test_a_tau_stopped_iteration_and_an_unfinished_run_are_named(run):
    sel = run / "iter1" / "selection.json"
    sel.write_text(json.dumps({"chosen": None, "best": "ckpt-2", "win_rate": 0.5, "stop": True, "tau": 0.6}))
    with pytest.raises(ModelPathError, match=r"none was selected .*0.5 < τ=0.6"):
        resolve_model(run / "iter1" / "policy", "policy")
    (run / "summary.json").unlink()
    with pytest.raises(ModelPathError, match=r"has not finished \(no summary.json\)"):
        resolve_model(run, "policy")
    with pytest.raises(ModelPathError, match=r"neither a model directory"):
        resolve_model(run / "iter1", "rm")
    with pytest.raises(ModelPathError, match=r"does not exist"):
        resolve_model(run / "nope", "rm")


def test_cli_refuses_a_checkpoints_directory_in_one_paragraph(run, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi"}]))
    p = subprocess.run([sys.executable, "eval/generate.py", "--policy", str(run / "iter1" / "policy"),
                        "--format", "alpacaeval", "--prompts", str(tmp_path / "a.json"),
                        "--out", str(tmp_path / "o.json")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert "ckpt-2 (selection.json)" in p.stderr


# ---- eval/generate.py's user errors


def test_generate_prompt_file_and_out_directory_errors_exit_2(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": ""}]))
    common = [sys.executable, "eval/generate.py", "--policy", str(tmp_path), "--format", "alpacaeval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*common, "--prompts", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o.json")],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "bad.json[row 1]: field 'instruction' is empty" in p.stderr
    p = subprocess.run([*common, "--prompts", str(tmp_path / "bad.json"), "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"--out {tmp_path}: is a directory" in p.stderr and f"Fix: --out {tmp_path / 'model_outputs.json'}" in p.stderr


# ---- eval/export.py


def test_export_writes_the_selected_models_with_a_card(run, tmp_path):
    out = tmp_path / "export"
    export.main(["--run", str(run), "--out", str(out), "--name", "MT-8B"])
    card = (out / "MT-8B" / "README.md").read_text()
    assert "`iter1/policy/ckpt-2` (the run's summary.json)" in card and "https://arxiv.org/abs/2506.06292" in card
    for row in ("| em.tau | `0.6` |", "| dpo.beta | `0.01` |", "| dpo.lr | `5e-07` |", "| preset | `paper` |",
                "| em.filter | `lqf` |"):
        assert row in card  # every key of config.json, flattened
    assert ("| iter1 | ckpt-1 0.500, ckpt-2 0.750, final 0.625 | ckpt-2 | 0.6 | no | 1.25 (lqf) | 9/10 | "
            "heldout_acc_new 0.812 |") in card
    assert "D_1 6, D_MS 2, D_R 3 prompts" in card
    assert "Not evaluated yet" in card and "Built with Meta Llama 3" not in card
    assert "holds no license file" in card
    # each exported directory loads in transformers and holds the selected checkpoint's weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    for name, auto, src in (("MT-8B", AutoModelForCausalLM, run / "iter1/policy/ckpt-2"),
                            ("MT-8B-RM", AutoModelForSequenceClassification, run / "iter1/rm/final")):
        model = auto.from_pretrained(str(out / name), local_files_only=True)
        ref = load_file(str(src / "model.safetensors"))
        got = model.state_dict()
        for k, v in ref.items():
            assert torch.equal(got[k], v), k
        assert (out / name / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_export_enforces_llama3_naming_and_license(tmp_path, tiny_checkpoint):
    run = make_run(tmp_path, tiny_checkpoint("llama", "lm", 3), tiny_checkpoint("llama", "score", 4),
                   base_name="Meta-Llama-3-8B-Instruct")
    out = tmp_path / "export"
    with pytest.raises(ConfigError, match=r"--name MT-8B: .*Llama 3.*Fix: --name Llama-3-MT-8B"):
        export.main(["--run", str(run), "--out", str(out), "--name", "MT-8B"])
    with pytest.raises(ConfigError, match=r"no LICENSE file.*put Meta's LICENSE file .* or pass --license_file"):
        export.main(["--run", str(run), "--out", str(out), "--name", "Llama-3-8B-Instruct-MT"])
    assert not out.exists()  # nothing written before every check passed
    cfg = json.loads((run / "config.json").read_text())
    for base in (cfg["policy"], cfg["rm"]):
        (Path(base) / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT\n")
        (Path(base) / "USE_POLICY.md").write_text("Acceptable use policy\n")
    export.main(["--run", str(run), "--out", str(out), "--name", "Llama-3-8B-Instruct-MT"])
    card = (out / "Llama-3-8B-Instruct-MT" / "README.md").read_text()
    assert "Built with Meta Llama 3." in card and "license: llama3" in card
    for name in ("Llama-3-8B-Instruct-MT", "Llama-3-8B-Instruct-MT-RM"):
        assert (out / name / "LICENSE").read_text().startswith("META LLAMA 3")
        assert (out / name / "USE_POLICY.md").is_file()
    # a base whose license file lives elsewhere
    other = tmp_path / "Meta-LICENSE"
    other.write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT\n")
    for base in (cfg["policy"], cfg["rm"]):
        (Path(base) / "LICENSE").unlink()
    export.main(["--run", str(run), "--out", str(out), "--name", "Llama-3-MT", "--license_file", str(other)])
    assert (out / "Llama-3-MT" / "LICENSE").read_bytes() == other.read_bytes()


# ---- eval/tables.py


def test_tables_from_synthetic_result_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "eval" / "alpacaeval" / "weighted_alpaca_eval_gpt4_turbo").mkdir(parents=True)
    (b / "eval").mkdir(parents=True)
    (a / "eval" / "rewardbench.json").write_text(json.dumps(
        {"sections": {"Chat": 98.21, "Chat Hard": 66.34, "Safety": 87.76, "Reasoning": 95.66}, "average": 87.0}))
    (a / "eval" / "alpacaeval" / "model_outputs.json").write_text(json.dumps([{"instruction": "x", "generator": "mt"}]))
    (a / "eval" / "alpacaeval" / "weighted_alpaca_eval_gpt4_turbo" / "leaderboard.csv").write_text(
        ",win_rate,standard_error,n_total,avg_length,length_controlled_winrate\n"
        "gpt4_turbo,50.0,0.0,805,2049,50.0\nmt,55.94,1.2,805,2177,54.06\n")
    (a / "eval" / "arenahard.json").write_text(json.dumps({"arena_hard": {"score": 38.4, "ci": "(-2.1, 2.0)",
                                                                         "avg_tokens": 682}}))
    (b / "eval" / "rewardbench.json").write_text(json.dumps(
        {"sections": {"Chat": 99.44, "Chat Hard": 65.13, "Safety": 87.8, "Reasoning": 86.4}, "average": 84.69}))
    text = tables.main(["--runs", f"{a},{b}", "--labels", "Mutual-Taught Iter2,FsfairX",
                        "--out", str(tmp_path / "t.md")])
    assert text == (tmp_path / "t.md").read_text()
    assert text.startswith(
        "Table 1: policy, AlpacaEval 2 and Arena-Hard (GPT-4 judged)\n\n"
        "| Model | AlpacaEval 2 LC Win Rate | AlpacaEval 2 Win Rate | AlpacaEval 2 Avg. Len | "
        "Arena-Hard Win Rate (95% CI) | Arena-Hard Avg. Len |\n|---|---|---|---|---|---|\n"
        "| Mutual-Taught Iter2 | 54.1 | 55.9 | 2177 | 38.4 (-2.1, +2.0) | 682 |\n"
        "| FsfairX | - | - | - | - | - |\n\n"
        "Table 2: reward model, RewardBench\n\n"
        "| Model | Chat | Chat Hard | Safety | Reasoning | Average |\n|---|---|---|---|---|---|\n"
        "| Mutual-Taught Iter2 | 98.2 | 66.3 | 87.8 | 95.7 | 87.0 |\n"
        "| FsfairX | 99.4 | 65.1 | 87.8 | 86.4 | 84.7 |\n")
    assert f"Not found (shown as -): {b}/eval/alpacaeval/**/leaderboard.csv, {b}/eval/arenahard.json" in text


def test_tables_name_a_bad_result_file(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "arenahard.json").write_text(json.dumps({"score": 38.4}))
    with pytest.raises(tables.ResultError, match=r"arenahard.json: expected .*show_result.py"):
        tables.collect(tmp_path)
