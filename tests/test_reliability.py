"""Nothing lost, nothing run that the user did not write (issue 15): a locked run directory, no pickle read
on resume, a half-written metrics row survives, a failed start pins no config, user errors as one paragraph
with exit status 2, and every bad input named."""
import json
import pickle
import subprocess
import sys

import pytest

from mt.checkpoint import CheckpointError, load_state_dict
from mt.data import DataError, read_json, read_pairs, read_prompts, write_jsonl
from test_run_em import REPO, _normalised, args, artifacts, inputs, kill_when, reference, run_em  # noqa: F401


def _one_paragraph(p):
    """A user error: exit 2, no traceback, one `error: ...` line naming what to change."""
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0], lines
    return lines[0]


def test_a_second_run_into_the_same_directory_is_refused(inputs, reference, tmp_path):
    out = tmp_path / "run"
    e = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # the first run pauses 20 s after its first stage, holding the lock (a tiny run is otherwise over in 5 s)
    first = subprocess.Popen([sys.executable, str(REPO / "tests" / "tools" / "at_stage.py"), "sleep:20", "splits",
                              *args(inputs, out)], cwd=REPO, env={**__import__("os").environ, **e},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "holding after splits" in first.stdout.readline() + first.stdout.readline()
    second = run_em(args(inputs, out), check=False)
    line = _one_paragraph(second)
    assert "is in use by pid" in line and str(first.pid) in line
    first.stdout.read()
    assert first.wait() == 0
    assert _normalised(artifacts(out), out) == _normalised(artifacts(reference), reference)  # nothing corrupted


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs on unpickling: creates the marker file


def test_resume_never_unpickles_and_survives_a_half_written_metrics_row(inputs, reference, tmp_path):
    out = tmp_path / "run"
    state = out / "iter1" / "policy" / "trainer_state" / "meta.json"
    kill_when(args(inputs, out), state)
    assert not read_json(state)["done"], "the kill must land inside the DPO stage"
    marker = tmp_path / "pwned"
    for name in (".metadata", "__0_0.distcp", "optimizer.pt"):  # what a DCP or torch.save reader would open
        (state.parent / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    with open(out / "iter1" / "policy" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 0.5, "lr"')  # a kill in the middle of an append
    run_em(args(inputs, out))
    assert not marker.exists()
    assert _normalised(artifacts(out), out) == _normalised(artifacts(reference), reference)


def test_a_failed_start_pins_nothing_and_the_corrected_command_runs(inputs, tmp_path):
    out = tmp_path / "run"
    typo = [a.replace("prompts.jsonl", "promts.jsonl") for a in args(inputs, out)]
    line = _one_paragraph(run_em(typo, check=False))
    assert "promts.jsonl: no such file" in line
    line = _one_paragraph(run_em(args(inputs, out) + ["--em.d_ms_size", "40"], check=False))
    assert "--em.d_ms_size=40" in line
    bad = tmp_path / "long.jsonl"
    write_jsonl(bad, [{"id": f"p{i}", "prompt": "hello" if i != 1 else "word " * 200} for i in range(32)])
    line = _one_paragraph(run_em([*args(inputs, out)[:-4], "--prompts", str(bad), "--out", str(out),
                                  "--em.keep_truncated", "true"], check=False))
    assert "prompt 'p1'" in line and "--sampling.max_prompt_tokens" in line
    line = _one_paragraph(run_em(args(inputs, out) + ["--em.tau", "1.5"], check=False))
    assert "--em.tau=1.5" in line
    assert not (out / "config.json").exists() and not (out / "manifest.json").exists()
    run_em(args(inputs, out) + ["--iters", "1"])  # corrected: accepted, not "a different config"


def test_a_moved_run_directory_resumes(inputs, reference, tmp_path):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    p = run_em(args(inputs, moved))
    assert "[run]" not in p.stdout, p.stdout  # every stage still recorded done after the move


def test_bad_inputs_are_named(tmp_path, tiny_rm_dir, tiny_llama_dir):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl:1: JSON nested too deeply"):
        read_prompts(deep)
    sur = tmp_path / "sur.jsonl"
    sur.write_text('{"id": "a", "prompt": "hi \\ud800 there"}\n')
    with pytest.raises(DataError, match=r"sur.jsonl:1: field 'prompt': holds a lone UTF-16 surrogate"):
        read_prompts(sur)
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt_id": "a", "prompt": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}],
                         "chosen": "x", "rejected": "y"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'prompt': last message has role 'assistant'"):
        read_pairs(pairs)
    (tmp_path / "manifest.json").write_text('{"stages": {')
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON .*Fix: delete it"):
        read_json(tmp_path / "manifest.json")
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(tiny_rm_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_state_dict(cut)
    import torch
    from safetensors.torch import load_file, save_file
    nan = tmp_path / "nan"
    shutil.copytree(tiny_llama_dir, nan)
    sd = load_file(str(nan / "model.safetensors"))
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(nan / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {k} holds NaN"):
        load_state_dict(nan)


def test_an_rm_given_as_the_policy_and_foreign_scores_are_named(inputs, tmp_path):
    out = tmp_path / "run"
    a = args(inputs, out)
    a[a.index("--policy") + 1] = str(inputs / "rm")
    line = _one_paragraph(run_em(a, check=False))
    assert "--policy" in line and "'score' head" in line
    samples = [{"prompt_id": "a", "prompt": "q", "responses": ["x", "y"], "finish_reasons": ["stop"] * 2,
                "num_tokens": [1, 1]}]
    write_jsonl(tmp_path / "s.jsonl", samples)
    write_jsonl(tmp_path / "sc.jsonl", [{"prompt_id": "a", "scores": [1.0, 0.0]}, {"prompt_id": "z", "scores": [0.0]}])
    p = run_em(["pairs", "--samples", str(tmp_path / "s.jsonl"), "--scores", str(tmp_path / "sc.jsonl"),
                "--out", str(tmp_path / "p.jsonl")], check=False)
    line = _one_paragraph(p)
    assert "prompt ids the samples do not" in line and "'z'" in line


def test_the_kill_soak_finds_every_resumed_trial_identical(inputs, tmp_path):
    """eval/soak.py itself, on the tiny run: random SIGKILLs, each trial resumed and compared."""
    from eval import soak
    flags = " ".join(args(inputs, tmp_path / "unused")[:-4] + ["--em.keep_truncated", "true"])
    summary = soak.main(["--trials", "2", "--kills", "2", "--seed", "3", "--args", flags, "--out", str(tmp_path / "s")])
    assert summary["identical"] == summary["trials"] == 2
    assert summary["sigkills"] >= 1  # at least one kill landed inside a run


def test_a_directory_with_its_own_tokenizer_code_never_runs_it(tiny_llama_dir, tmp_path, monkeypatch):
    import io
    import shutil
    from mt.chat import ChatTemplateError, load_tokenizer
    d = tmp_path / "evil"
    shutil.copytree(tiny_llama_dir, d)
    marker = tmp_path / "ran"
    (d / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a user who would answer "yes" to the prompt
    try:
        load_tokenizer(d)
    except ChatTemplateError:
        pass  # refusing the directory is fine; running its code is not
    assert not marker.exists()
