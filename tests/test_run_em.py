"""run_em.py end to end on tiny checkpoints: T=2, resumable after SIGKILL, same under torchrun.

The reference is an uninterrupted single-process run; every other run must reproduce its artifacts
(bit for bit after a crash and resume; to float rounding under 2 processes).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
# files that hold wall-clock times (or RNG bytes saved with them) or the lock holder's pid, not results
TIMING_FILES = {"manifest.json", "metrics.jsonl", "meta.json", ".lock"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("em_inputs")
    make_tiny_checkpoint(root / "policy", "llama", "lm", seed=0, tokenizer_style="chatml")
    make_tiny_checkpoint(root / "rm", "llama", "score", seed=1, tokenizer_style="chatml")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"hello {i} world"}) + "\n")
    return root


def args(inputs, out):
    # a random tiny policy rarely stops within 8 tokens: keep truncated responses so pairs exist
    return ["--preset", "tiny", "--policy", str(inputs / "policy"), "--rm", str(inputs / "rm"),
            "--prompts", str(inputs / "prompts.jsonl"), "--out", str(out), "--em.keep_truncated", "true"]


def run_em(argv, env=None, launcher=(sys.executable,), check=True, script=REPO / "run_em.py", pre=()):
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([*launcher, str(script), *pre, *argv], cwd=REPO, env=e, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"run_em exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def artifacts(run: Path) -> dict[str, bytes]:
    """Every result file, with the run directory's own path normalised away."""
    out = {}
    for f in sorted(run.rglob("*")):
        if f.is_file() and f.name not in TIMING_FILES:
            out[str(f.relative_to(run))] = f.read_bytes().replace(str(run).encode(), b"<RUN>")
    return out


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("em_ref") / "run"
    p = run_em(args(inputs, out))
    assert "| 1.2 |" in p.stdout  # the end-of-run table has both iterations
    return out


def test_uninterrupted_run_is_complete(inputs, reference):
    stages = json.loads((reference / "manifest.json").read_text())["stages"]
    for t in (1, 2):
        for s in ("sample", "score", "pairs", "ref_logps", "dpo", "select", "pseudo_pairs", "rm_data", "rm",
                  "rm_eval"):
            assert stages[f"iter{t}/{s}"]["status"] == "done"
    summary = json.loads((reference / "summary.json").read_text())
    assert [h["iter"] for h in summary["iterations"]] == [1, 2]
    # the selected policy and the final RM, relative to the run (a moved run still names its models)
    sel2 = json.loads((reference / "iter2" / "selection.json").read_text())
    assert summary["policy"] == f"iter2/policy/{sel2['chosen']}" and summary["rm"] == "iter2/rm/final"
    # the E-step of iteration 2 sampled from the selected π_1 and was judged by r_1
    sel = json.loads((reference / "iter1" / "selection.json").read_text())
    assert summary["iterations"][0]["selection"]["chosen"] == sel["chosen"]
    pseudo = [json.loads(line) for line in open(reference / "iter1" / "pseudo_pairs.jsonl")]
    info = json.loads((reference / "iter1" / "pseudo_pairs.info.json").read_text())
    assert all(r["eps"] == info["eps_t"] for r in pseudo)
    rm_train = [json.loads(line) for line in open(reference / "iter1" / "rm_train.jsonl")]
    pairs1 = [json.loads(line) for line in open(reference / "iter1" / "pairs.jsonl")]
    heldout = {json.loads(line)["prompt_id"] for line in open(reference / "iter1" / "rm_heldout.jsonl")}
    kept = [r for r in pseudo if r["kept"] and r["prompt_id"] not in heldout]
    assert len(rm_train) == len(kept) + len(pairs1)  # mixed = kept pseudo-pairs + E-step pairs (D_1)
    # a rerun of the same command finds every stage done and changes nothing
    before = artifacts(reference)
    p = run_em(args(inputs, reference))
    assert "[run]" not in p.stdout and p.stdout.count("[done]") == len(stages)
    assert artifacts(reference) == before


def test_sigkill_after_every_stage_then_resume_is_identical(inputs, reference, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stages = list(json.loads((reference / "manifest.json").read_text())["stages"])
    for name in stages:  # each rerun skips what is recorded, runs one more stage, and is killed
        p = run_em(args(inputs, out), script=REPO / "tests" / "tools" / "at_stage.py", pre=["kill", name], check=False)
        assert p.returncode == -signal.SIGKILL, (name, p.returncode, p.stderr[-2000:])
        recorded = json.loads((out / "manifest.json").read_text())["stages"]
        assert list(recorded)[-1] == name and len(recorded) == stages.index(name) + 1
    run_em(args(inputs, out))
    assert _normalised(artifacts(out), out) == _normalised(artifacts(reference), reference)


def _normalised(arts: dict, run: Path) -> dict:
    # config.json records --out itself; every other file must match byte for byte
    return {k: (v if k != "config.json" else b"") for k, v in arts.items()}


def kill_when(argv, path):
    """Start run_em.py with argv and SIGKILL it as soon as `path` exists (or it ends, or 300 s pass)."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run_em.py"), *argv], cwd=REPO, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_in_the_middle_of_dpo_then_resume_is_identical(inputs, reference, tmp_path):
    out = tmp_path / "run"
    kill_when(args(inputs, out), out / "iter1" / "policy" / "ckpt-1" / "config.json")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert "iter1/ref_logps" in stages and "iter1/dpo" not in stages, "the kill must land inside the DPO stage"
    run_em(args(inputs, out))
    assert _normalised(artifacts(out), out) == _normalised(artifacts(reference), reference)


def test_torchrun_two_processes_gives_the_same_artifacts(inputs, reference, tmp_path):
    out = tmp_path / "run"
    run_em(args(inputs, out), launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    ref, got = artifacts(reference), artifacts(out)
    assert sorted(ref) == sorted(got)
    for name in ref:
        if name.endswith(".safetensors"):
            a, b = load_file(str(reference / name)), load_file(str(out / name))
            assert a.keys() == b.keys()
            for k in a:  # the same computation in another reduction order
                # Adam turns a ~0 gradient into a ±lr step whose sign rounding decides, so a few isolated
                # coordinates may differ by up to lr per step (tiny preset: lr 1e-3, 3 steps); a real bug
                # (e.g. a loss normalised by the local instead of the global pair count) moves nearly all
                diff = (a[k] - b[k]).abs()
                assert (diff <= 1e-4).float().mean() >= 0.99 and diff.max() <= 3e-3, (name, k, diff.max())
        elif name.endswith((".jsonl", ".json")) and name != "config.json":
            _assert_close_json(_load(ref[name], name), _load(got[name], name), name)


def _load(data: bytes, name: str):
    text = data.decode()
    return [json.loads(line) for line in text.splitlines() if line] if name.endswith(".jsonl") else json.loads(text)


def _assert_close_json(a, b, where):
    """Text, ids, counts and decisions equal; floats (scores, losses) equal to rounding."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            # DPO accuracy counts strict wins: at step 1 the policy equals the reference, every margin is 0
            # in one process and ±1e-7 in two, so this one discontinuous metric may differ
            if k not in ("reward_acc", "accuracy"):
                _assert_close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_json(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _copy_run(reference, out):
    import shutil
    shutil.copytree(reference, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["out"] = str(out)  # the copy lives elsewhere: only --out differs from the original
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_changed_config_is_refused_then_forced_redoes_only_downstream(inputs, reference, tmp_path):
    out = _copy_run(reference, tmp_path / "run")
    p = run_em(args(inputs, out) + ["--dpo.beta", "0.2"], check=False)
    assert p.returncode != 0 and "dpo.beta: 0.1 -> 0.2" in p.stderr and "--force_config" in p.stderr
    before = json.loads((out / "manifest.json").read_text())["stages"]
    p = run_em(args(inputs, out) + ["--dpo.beta", "0.2", "--force_config", "true"])
    after = json.loads((out / "manifest.json").read_text())["stages"]
    assert "[done] iter1/pairs" in p.stdout and "[run]  iter1/dpo  (inputs or config changed" in p.stdout
    for s in ("splits", "iter1/sample", "iter1/score", "iter1/pairs", "iter1/ref_logps"):
        assert after[s] == before[s], s  # upstream of DPO: untouched
    assert after["iter1/dpo"]["params"] != before["iter1/dpo"]["params"]


def test_a_key_added_since_the_run_began_resumes_at_its_default_only(inputs, reference, tmp_path):
    """A run from before a flag existed (its config.json lacks the key) resumes as it is when the flag is
    at its default (the behaviour the run had); the flag at another value is a changed config."""
    out = _copy_run(reference, tmp_path / "run")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["em"]["on_stop"], cfg["em"]["tie_credit"]
    (out / "config.json").write_text(json.dumps(cfg))
    p = run_em(args(inputs, out))
    assert "[run]" not in p.stdout  # every stage done: nothing redone
    assert json.loads((out / "config.json").read_text())["em"]["on_stop"] == "end"  # the full config again
    (out / "config.json").write_text(json.dumps(cfg))  # without the keys again
    p = run_em(args(inputs, out) + ["--em.on_stop", "skip"], check=False)
    assert p.returncode == 2 and 'em.on_stop: null -> "skip"' in p.stderr


def test_scheduling_only_settings_may_change_on_resume(inputs, reference, tmp_path):
    """Fewer KV slots (after an out-of-memory) or another check interval give the same samples
    (test_sampler), so a finished run resumes with them: no refusal, nothing redone."""
    out = _copy_run(reference, tmp_path / "run")
    before = json.loads((out / "manifest.json").read_text())["stages"]
    p = run_em(args(inputs, out) + ["--sampling.slots", "3", "--sampling.check_every", "2"])
    assert "[run]" not in p.stdout and "[done] iter2/rm" in p.stdout, p.stdout
    assert json.loads((out / "manifest.json").read_text())["stages"] == before
    p = run_em(args(inputs, out) + ["--sampling.top_p", "0.5"], check=False)  # one that changes what is sampled
    assert p.returncode != 0 and "sampling.top_p: 0.95 -> 0.5" in p.stderr


def test_standalone_stage_commands_reproduce_the_run(inputs, reference, tmp_path):
    """`python run_em.py STAGE ...` reads and writes the same files as the loop, byte for byte."""
    tiny = ["--preset", "tiny", "--em.keep_truncated", "true"]
    ref1 = reference / "iter1"
    run_em(["sample", "--model", str(inputs / "policy"), "--prompts", str(reference / "splits" / "D_1.jsonl"),
            "--out", str(tmp_path / "samples.jsonl"), "--stream", "iter1/e-step", *tiny])
    assert (tmp_path / "samples.jsonl").read_bytes() == (ref1 / "samples.jsonl").read_bytes()
    run_em(["pairs", "--samples", str(ref1 / "samples.jsonl"), "--scores", str(ref1 / "scores.jsonl"),
            "--out", str(tmp_path / "pairs.jsonl"), *tiny])
    assert (tmp_path / "pairs.jsonl").read_bytes() == (ref1 / "pairs.jsonl").read_bytes()
    run_em(["select", "--prev", str(inputs / "policy"), "--candidates", str(ref1 / "policy"), "--rm",
            str(inputs / "rm"), "--prompts", str(reference / "splits" / "D_MS.jsonl"), "--out", str(tmp_path / "sel"),
            "--stream", "iter1", *tiny])
    assert (tmp_path / "sel" / "selection.json").read_bytes() == (ref1 / "selection.json").read_bytes()
    # filter: the same strategy reproduces the file; another one re-decides from the stored margins
    run_em(["filter", "--pseudo_pairs", str(ref1 / "pseudo_pairs.jsonl"), "--out", str(tmp_path / "pp.jsonl"), *tiny])
    assert (tmp_path / "pp.jsonl").read_bytes() == (ref1 / "pseudo_pairs.jsonl").read_bytes()
    run_em(["filter", "--pseudo_pairs", str(ref1 / "pseudo_pairs.jsonl"), "--out", str(tmp_path / "hqs.jsonl"),
            "--em.filter", "hqs", "--em.eps_stat", "std", "--em.eps_mult", "1", *tiny])
    rows = [json.loads(line) for line in open(tmp_path / "hqs.jsonl")]
    scores = [r["score_prev"] for r in rows]
    mean = sum(scores) / len(scores)
    eps = (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5
    assert [r["kept"] for r in rows] == [r["valid"] and r["delta"] >= eps and r["y_t"] != r["y_prev"] for r in rows]


def test_second_round_restarts_from_the_base_models(inputs, tmp_path):
    """Sec. 5.3: round 2 samples with round 1's final models, but DPO starts (and takes its reference)
    from π0 and the RM from r0."""
    out = tmp_path / "run"
    run_em(args(inputs, out) + ["--iters", "1", "--em.rounds", "2"])
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    r1, r2 = out / "round1" / "iter1", out / "round2" / "iter1"
    pi1 = r1 / "policy" / json.loads((r1 / "selection.json").read_text())["chosen"]
    # round 2's E-step samples came from π_1 of round 1 and were judged by r_1 of round 1 ...
    assert str(pi1.relative_to(out)) in stages["round2/iter1/sample"]["inputs"]
    assert "round1/iter1/rm/final" in stages["round2/iter1/score"]["inputs"]
    # ... while its DPO started from, and used as the reference, the base policy
    assert str(inputs / "policy") in stages["round2/iter1/dpo"]["inputs"]
    assert all(json.loads(line)["ref"] == str(inputs / "policy") for line in open(r2 / "ref_logps.jsonl"))
    assert str(inputs / "rm") in stages["round2/iter1/rm"]["inputs"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(h["round"], h["iter"]) for h in summary["iterations"]] == [(1, 1), (2, 1)]


@pytest.fixture(scope="module")
def sandbox_rounds2(tmp_path_factory):
    """A small sandbox-preset run with two rounds of one iteration: gold diagnostics on."""
    from mt import sandbox
    root = tmp_path_factory.mktemp("sandbox_rounds2")
    w = sandbox.build_world(seed=5, cache_dir=root / "cache", n_prompts=40, sft_examples=640, sft_epochs=1,
                            rm_prompts=40, rm_epochs=1, eval_prompts=16)
    out = root / "run"
    p = run_em(["--preset", "sandbox", "--policy", str(w.policy_dir), "--rm", str(w.rm_dir), "--prompts",
                str(w.prompts_path), "--out", str(out), "--iters", "1", "--em.rounds", "2", "--em.d_ms_size", "8",
                "--em.tau", "0", "--dpo.batch_size", "8", "--dpo.micro_batch_size", "8", "--dpo.save_every", "1",
                "--rm_train.batch_size", "8", "--rm_train.micro_batch_size", "8"])
    return out, p


def test_sandbox_preset_with_two_rounds_prints_the_gold_table(sandbox_rounds2):
    """The run layout is named in one place (mt/manifest.py iteration_dir): with --em.rounds 2 the run
    writes round{r}/iter{t} and the sandbox's gold view finds them (it once globbed iter* and failed)."""
    from mt import gold, sandbox
    out, p = sandbox_rounds2
    printed = p.stdout.split("Gold view")[1].strip().split("\n\n")[0]  # the per-iteration table
    rows = [line for line in printed.splitlines() if line.startswith("| round")]
    assert [r.split(" | ")[0] for r in rows] == ["| round1/iter1", "| round2/iter1"], printed
    view = gold.gold_view(out)  # the same rows from the artifacts alone
    assert [r["iter"] for r in view] == ["round1/iter1", "round2/iter1"]
    chosen = json.loads((out / "round2" / "iter1" / "selection.json").read_text())["chosen"]
    new = [json.loads(x) for x in open(out / "round2" / "iter1" / "selection" / f"{chosen}.samples.jsonl")]
    assert view[1]["policy_gold"] == pytest.approx(sandbox.policy_gold(new))  # gold of the chosen π on D_MS


def test_status_of_a_sandbox_run_lists_every_recorded_stage_in_order(sandbox_rounds2):
    """`run_em.py status` plans from the stage list run() checks itself against (mt/manifest.py
    iteration_stages), so the sandbox's gold stages appear where the run recorded them (they once were
    missing from a hand-written plan and listed last, out of order)."""
    out, _ = sandbox_rounds2
    recorded = list(json.loads((out / "manifest.json").read_text())["stages"])
    assert {"round1/iter1/gold_curve", "round2/iter1/gold"} <= set(recorded)
    text = run_em(["status", "--out", str(out)]).stdout
    stages = [tuple(line.split()[:2]) for line in text.splitlines()
              if line.split()[0] in ("done", "running", "left", "skipped")]
    assert stages == [("done", name) for name in recorded], text
    assert text.splitlines()[0].startswith(f"{out}: finished; {len(recorded)} of {len(recorded)} stages done")


def test_keep_only_the_selected_checkpoints_and_still_resume(inputs, reference, tmp_path):
    """--em.keep_checkpoints selected deletes the candidates selection did not choose; a rerun finds every
    stage done, and every other artifact equals the run that kept them."""
    out = tmp_path / "run"
    run_em(args(inputs, out) + ["--em.keep_checkpoints", "selected"])
    for t in (1, 2):
        chosen = json.loads((out / f"iter{t}" / "selection.json").read_text())["chosen"]
        kept = sorted(p.name for p in (out / f"iter{t}" / "policy").iterdir() if p.name.startswith(("ckpt", "final")))
        assert kept == [chosen]
    p = run_em(args(inputs, out) + ["--em.keep_checkpoints", "selected"])
    assert "[run]" not in p.stdout, p.stdout
    ref = {k: v for k, v in artifacts(reference).items() if k != "config.json"}
    got = {k: v for k, v in artifacts(out).items() if k != "config.json"}
    assert {k: v for k, v in ref.items() if k in got} == got  # nothing else changed
    assert all(("/policy/ckpt-" in k or "/policy/final/" in k) for k in set(ref) - set(got))
