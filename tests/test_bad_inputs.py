"""Every bad input of issue 27 is one paragraph, `error: <where>: <what>. Fix: ...`, exit status 2,
no traceback, and the files written before it unchanged; two writers into one directory are
refused at once, naming the holder.

The commands run through their real exit path (mt.dist.run) in a forked child of this process, so a
case costs its own work, not a Python + torch start (the concurrent-writer cases use real
processes). One tiny finished run is shared by the whole module (test_run_em's `reference`).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import run_em
from eval import generate, plot_run, sandbox_calibrate, sandbox_report, soak, winrate
from mt import checkpoint, dist, sandbox, sampler
from mt.data import write_jsonl
from mt.manifest import ANCESTORS_ENV, lock_run_dir
from test_run_em import REPO, args, artifacts, inputs, kill_when, reference  # noqa: F401


def cli(main, argv, tmp_path, env=None):
    """main(argv) under mt.dist.run in a forked child: (exit status, stdout, stderr)."""
    out, err = tmp_path / ".cli.out", tmp_path / ".cli.err"
    pid = os.fork()
    if pid == 0:  # the child: what `python script.py argv` does after its imports
        code = 1
        try:
            os.environ.update(env or {})
            sys.stdout = open(out, "w", buffering=1)
            sys.stderr = open(err, "w", buffering=1)
            dist.run(lambda: main(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text(), err.read_text()


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".cli.") and p.name != ".lock"}


# ---- the inputs: each builder makes its files under `d` and returns the command's argv

def _samples(d, bad_line=None):
    rows = [{"prompt_id": f"p{i}", "prompt": "q", "responses": ["x", "yy"],
             "finish_reasons": ["stop"] * 2, "num_tokens": [1, 2]} for i in range(5)]
    write_jsonl(d / "s.jsonl", rows)
    if bad_line:
        lines = (d / "s.jsonl").read_text().splitlines()
        lines[bad_line - 1] = lines[bad_line - 1].replace('"num_tokens": [1, 2]', '"num_tokens": [1]')
        (d / "s.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(d / "sc.jsonl", [{"prompt_id": f"p{i}", "scores": [1.0, 0.0]} for i in range(5)])


def _copy_model(src, d, name="m"):
    shutil.copytree(src, d / name)
    return d / name


def long_prompt(d, ins, ref):
    write_jsonl(d / "p.jsonl", [{"id": "p0", "prompt": "hi"}, {"id": "p1", "prompt": "word " * 200}])
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(d / "p.jsonl"),
                         "--out", str(d / "s.jsonl"), "--preset", "tiny"]


def long_prompt_sampler(d, ins, ref):  # python -m mt.sampler: the sampler's own check
    write_jsonl(d / "p.jsonl", [{"id": "p0", "prompt": "hi"}, {"id": "p1", "prompt": "word " * 200}])
    return sampler.main, ["--model", str(ins / "policy"), "--prompts", str(d / "p.jsonl"),
                          "--out", str(d / "s.jsonl"), "--sampling.max_new_tokens", "2", "--sampling.max_prompt_tokens",
                          "64", "--device", "cpu"]


def long_prompt_generate(d, ins, ref):  # eval/generate.py: the sampler's own check
    (d / "a.json").write_text(json.dumps([{"instruction": "hi"}, {"instruction": "word " * 200}]))
    return generate.main, ["--policy", str(ins / "policy"), "--format", "alpacaeval", "--prompts",
                           str(d / "a.json"), "--out", str(d / "res" / "model_outputs.json"),
                           "--sampling.max_new_tokens", "2", "--sampling.max_prompt_tokens", "64",
                           "--device", "cpu"]


def huge_line(d, ins, ref):
    (d / "p.jsonl").write_text(json.dumps({"id": "big", "prompt": "x" * 20_000_000}) + "\n")
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(d / "p.jsonl"),
                         "--out", str(d / "s.jsonl"), "--preset", "tiny"]


def not_parquet(d, ins, ref):
    (d / "p.parquet").write_text('{"id": "a", "prompt": "hi"}\n')
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(d / "p.parquet"),
                         "--out", str(d / "s.jsonl")]


def cut_parquet(d, ins, ref):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hi", "there"]}), d / "p.parquet")
    data = (d / "p.parquet").read_bytes()
    (d / "p.parquet").write_bytes(data[: len(data) // 2])
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(d / "p.parquet"),
                         "--out", str(d / "s.jsonl")]


def escaping_template(d, ins, ref):
    m = _copy_model(ins / "policy", d)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    (m / "chat_template.jinja").unlink(missing_ok=True)
    return run_em.main, ["sample", "--model", str(m), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "s.jsonl")]


def rm_as_model(d, ins, ref):
    return run_em.main, ["sample", "--model", str(ins / "rm"), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "s.jsonl")]


def out_is_directory(d, ins, ref):
    (d / "here").mkdir()
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "here")]


def run_out_is_file(d, ins, ref):
    (d / "run").write_text("not a directory\n")
    return run_em.main, args(ins, d / "run")


def nan_pseudo_pair(d, ins, ref):
    lines = (ref / "iter1" / "pseudo_pairs.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["note"] = float("nan")  # a field the reader keeps as it is
    lines[0] = json.dumps(row)
    (d / "pp.jsonl").write_text("\n".join(lines) + "\n")
    return run_em.main, ["filter", "--pseudo_pairs", str(d / "pp.jsonl"), "--out", str(d / "f.jsonl")]


def winrate_other_prompts(d, ins, ref):
    _samples(d)
    rows = [json.loads(x) for x in (d / "s.jsonl").read_text().splitlines()]
    rows[0]["prompt_id"] = "other"
    write_jsonl(d / "s2.jsonl", rows)
    return winrate.main, ["--rm", str(ins / "rm"), "--new", str(d / "s.jsonl"), "--old", str(d / "s2.jsonl")]


def _run_copy(d, ref):
    run = d / "run"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def status_config_without_section(d, ins, ref):
    run = _run_copy(d, ref)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["em"]
    (run / "config.json").write_text(json.dumps(cfg))
    return run_em.main, ["status", "--out", str(run)]


def rerun_config_without_section(d, ins, ref):
    status_config_without_section(d, ins, ref)
    return run_em.main, args(ins, d / "run")


def plot_info_without_key(d, ins, ref):
    run = _run_copy(d, ref)
    info = json.loads((run / "iter1" / "pseudo_pairs.info.json").read_text())
    del info["eps_t"]
    (run / "iter1" / "pseudo_pairs.info.json").write_text(json.dumps(info))
    return plot_run.main, [str(run), "--out", str(d / "plots")]


def status_info_without_key(d, ins, ref):
    plot_info_without_key(d, ins, ref)
    return run_em.main, ["status", "--out", str(d / "run")]


def prompts_is_directory(d, ins, ref):
    (d / "prompts").mkdir()
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(d / "prompts"),
                         "--out", str(d / "s.jsonl")]


def bad_samples_line(d, ins, ref):
    _samples(d, bad_line=4)
    return run_em.main, ["pairs", "--samples", str(d / "s.jsonl"), "--scores", str(d / "sc.jsonl"),
                         "--out", str(d / "p.jsonl")]


def no_tokenizer_files(d, ins, ref):
    m = _copy_model(ins / "policy", d)
    for f in m.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    return run_em.main, ["sample", "--model", str(m), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "s.jsonl")]


def model_is_file(d, ins, ref):
    return run_em.main, ["sample", "--model", str(ins / "prompts.jsonl"), "--prompts",
                         str(ins / "prompts.jsonl"), "--out", str(d / "s.jsonl")]


def shard_size_one_process(d, ins, ref):
    return run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "s.jsonl"), "--dist.shard_size", "3"]


def bad_generation_config(d, ins, ref, text="{\"eos_token_id\": [2,"):
    m = _copy_model(ins / "policy", d)
    (m / "generation_config.json").write_text(text)
    return run_em.main, ["sample", "--model", str(m), "--prompts", str(ins / "prompts.jsonl"),
                         "--out", str(d / "s.jsonl")]


def eos_not_ids(d, ins, ref):
    return bad_generation_config(d, ins, ref, '{"eos_token_id": "</s>"}')


def plot_bad_metrics_row(d, ins, ref):
    run = _run_copy(d, ref)
    lines = (run / "iter1" / "policy" / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a row cut in the middle of the file, not its tail
    (run / "iter1" / "policy" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return plot_run.main, [str(run), "--out", str(d / "plots")]


def report_run_without_iterations(d, ins, ref):
    (d / "run").mkdir()
    shutil.copy(ref / "config.json", d / "run" / "config.json")
    return sandbox_report.main, ["--run", str(d / "run")]


def _generate(d, ins, prompts, fmt="alpacaeval", out="model_outputs.json"):
    return generate.main, ["--policy", str(ins / "policy"), "--format", fmt, "--prompts", str(prompts),
                           "--out", str(d / out), "--device", "cpu"]


def alpacaeval_row_not_object(d, ins, ref):
    (d / "a.json").write_text(json.dumps([{"instruction": "hi"}, "what?"]))
    return _generate(d, ins, d / "a.json")


def arenahard_row_not_object(d, ins, ref):
    (d / "q.jsonl").write_text('{"uid": "a", "prompt": "hi"}\n[1, 2]\n')
    return _generate(d, ins, d / "q.jsonl", "arenahard", "policy.jsonl")


def generate_out_a_directory(d, ins, ref):
    (d / "a.json").write_text(json.dumps([{"instruction": "hi"}]))
    (d / "res").mkdir()
    return _generate(d, ins, d / "a.json", out="res")


def plot_config_without_section(d, ins, ref):
    status_config_without_section(d, ins, ref)
    return plot_run.main, [str(d / "run"), "--out", str(d / "plots")]


CASES = {  # name: (builder, words the one paragraph must hold)
    "prompt over --sampling.max_prompt_tokens": (long_prompt, ["prompt 'p1'", "tokens", "--sampling.max_prompt_tokens"]),
    "prompt over the limit (python -m mt.sampler)": (long_prompt_sampler, [
        "p.jsonl: prompt 'p1'", "tokens", "--sampling.max_prompt_tokens=64"]),
    "prompt over the limit (eval/generate.py)": (long_prompt_generate, [
        "a.json (ids: row numbers from 0): prompt '1'", "tokens", "--sampling.max_prompt_tokens=64"]),
    "one 20 MB prompt line": (huge_line, ["prompt 'big'", "characters", "--sampling.max_prompt_tokens"]),
    ".parquet that is not parquet": (not_parquet, ["p.parquet", "not a readable parquet file"]),
    "truncated .parquet": (cut_parquet, ["p.parquet", "not a readable parquet file"]),
    "chat template escaping the sandbox": (escaping_template, ["m:", "sandbox", "chat_template"]),
    "reward model as sample --model": (rm_as_model, ["'score' head", "causal LM"]),
    "sample --out an existing directory": (out_is_directory, ["here", "is a directory", "samples.jsonl"]),
    "run_em.py --out an existing file": (run_out_is_file, ["run", "is a file"]),
    "NaN in a pseudo-pairs row (filter)": (nan_pseudo_pair, ["pp.jsonl:1", "field 'note'", "not finite"]),
    "winrate on files of different prompts": (winrate_other_prompts, ["hold different prompts", "'other'"]),
    "status: config.json lacks a section": (status_config_without_section, ["config.json", "'em'"]),
    "rerun: config.json lacks a section": (rerun_config_without_section, ["config.json", "em."]),
    "plot_run: pseudo_pairs.info.json lacks a key": (plot_info_without_key, ["pseudo_pairs.info.json", "'eps_t'"]),
    "status: pseudo_pairs.info.json lacks a key": (status_info_without_key, ["pseudo_pairs.info.json", "'eps_t'"]),
    "a directory as the prompt file": (prompts_is_directory, ["prompts", "is a directory"]),
    "a bad samples line for pairs": (bad_samples_line, ["s.jsonl:4", "num_tokens"]),
    "a model directory without tokenizer files": (no_tokenizer_files, ["m:", "no tokenizer files"]),
    "--model a file": (model_is_file, ["prompts.jsonl", "is a file, not a model directory"]),
    "generation_config.json cut short": (bad_generation_config, [
        "m/generation_config.json", "not valid JSON", "Fix: correct it"]),
    "generation_config.json eos not token ids": (eos_not_ids, [
        "m/generation_config.json", "eos_token_id '</s>'"]),
    "plot_run: a cut metrics.jsonl row": (plot_bad_metrics_row, [
        "iter1/policy/metrics.jsonl:2", "not a JSON object row"]),
    "sandbox_report --run: no iterations": (report_run_without_iterations, [
        "run: no iteration directories"]),
    "eval/generate.py: an AlpacaEval row not an object": (alpacaeval_row_not_object, [
        "a.json", "row is not an object"]),
    "eval/generate.py: an Arena-Hard row not an object": (arenahard_row_not_object, [
        "q.jsonl:2", "row is not an object"]),
    "eval/generate.py --out an existing directory": (generate_out_a_directory, [
        "res: is a directory", "res/model_outputs.json"]),
    "plot_run: config.json lacks a section": (plot_config_without_section, ["config.json", "'em'"]),
    "--dist.shard_size 3 in one process": (shard_size_one_process, ["--dist.shard_size=3", "1 process"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_paragraph(name, inputs, reference, tmp_path):
    build, words = CASES[name]
    main, argv = build(tmp_path, inputs, reference)
    before = tree_hash(tmp_path)
    code, _, err = cli(main, argv, tmp_path)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and lines[0].startswith("error: ") and "Fix:" in err, err[-3000:]
    for w in words:
        assert w in err, (w, err)
    assert tree_hash(tmp_path) == before, "a refused command changed files written before it"
    if name == "a bad samples line for pairs":
        assert "sc.jsonl" not in err  # the samples file's error, not reported as the scores file's


def test_a_full_disk_is_one_paragraph(inputs, reference, tmp_path):
    """A checkpoint write that hits ENOSPC (safetensors' own error, as it raises it) names the path and
    the space needed; the inputs are untouched."""
    def full(*a, **k):
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                        'message: "No space left on device" })')

    def dpo_on_a_full_disk(argv):
        checkpoint.save_file = full  # in the forked child only
        return run_em.main(argv)
    before = tree_hash(reference)
    code, _, err = cli(dpo_on_a_full_disk, ["dpo", "--policy", str(inputs / "policy"), "--pairs",
                                            str(reference / "iter1" / "pairs.jsonl"), "--out",
                                            str(tmp_path / "dpo"), "--preset", "tiny"], tmp_path)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "the disk is full" in err and "GiB to write" in err and "Fix: free space" in err, err
    assert str(tmp_path / "dpo") in err
    assert tree_hash(reference) == before


def test_a_missing_or_edited_side_file_reruns_its_stage(inputs, reference, tmp_path):
    """pairs.stats.json / pseudo_pairs.info.json are stage outputs: a rerun redoes their stage."""
    run = _run_copy(tmp_path, reference)
    (run / "iter1" / "pairs.stats.json").unlink()
    info = json.loads((run / "iter2" / "pseudo_pairs.info.json").read_text())
    del info["eps_t"]
    (run / "iter2" / "pseudo_pairs.info.json").write_text(json.dumps(info))
    code, out, err = cli(run_em.main, args(inputs, run), tmp_path)
    assert code == 0, err[-3000:]
    assert "[run]  iter1/pairs" in out and "[run]  iter2/pseudo_pairs" in out, out
    assert "[run]  iter1/dpo" not in out  # pairs came out the same: nothing downstream reran
    strip = {"manifest.json", "config.json"}
    ref = artifacts(reference)
    got = {k: v.replace(str(reference).encode(), b"<RUN>") for k, v in artifacts(run).items()}
    assert {k: v for k, v in got.items() if Path(k).name not in strip} == \
        {k: v for k, v in ref.items() if Path(k).name not in strip}


def test_the_sandbox_cache_names_the_entry_to_delete_and_drops_abandoned_builds(tmp_path):
    cache = tmp_path / "cache"
    c = sandbox.WORLDS["general"]
    root = cache / f"sandbox-{sandbox.world_key(c)}"
    (root / "policy").mkdir(parents=True)
    (root / "world.json").write_text("{}")  # a world.json, but nothing it stands for
    stale = cache / f".{root.name}.tmp-deadbeef"  # a killed build's temporary directory
    (stale / "policy").mkdir(parents=True)
    code, _, err = cli(run_em.main, ["--out", str(tmp_path / "run")], tmp_path,
                       env={"MT_SANDBOX_CACHE": str(cache)})
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert f"delete {root}" in err and "damaged" in err, err
    assert not stale.exists()


def test_a_dpo_state_missing_a_tensor_is_refused(inputs, reference, tmp_path):
    out = tmp_path / "dpo"
    argv = ["dpo", "--policy", str(inputs / "policy"), "--pairs", str(reference / "iter1" / "pairs.jsonl"),
            "--out", str(out), "--preset", "tiny"]
    state = out / "policy" / "trainer_state" / "meta.json"
    kill_when(argv, state)
    meta = json.loads(state.read_text())
    assert not meta["done"], "the kill must land inside the DPO stage"
    shard = state.parent / "rank0-of-1.safetensors"
    tensors = load_file(str(shard))
    del tensors[sorted(k for k in tensors if k.startswith("optim/"))[0]]
    save_file(tensors, str(shard))
    before = tree_hash(out)
    code, _, err = cli(run_em.main, argv, tmp_path)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "tensors missing" in err and f"delete {state.parent}" in err, err
    assert tree_hash(out) == before


# ---- two writers into one directory, as real processes


def _start(argv, script=REPO / "run_em.py", pre=()):
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *pre, *argv], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_dpo_stages_into_one_directory(inputs, reference, tmp_path):
    def argv(out):
        return ["dpo", "--policy", str(inputs / "policy"), "--pairs",
                str(reference / "iter1" / "pairs.jsonl"), "--out", str(out), "--preset", "tiny"]
    same = tmp_path / "same"
    a, b = _start(argv(same)), _start(argv(same))  # started together
    t0 = time.time()
    procs = {a.pid: a, b.pid: b}
    loser = None
    while loser is None and time.time() - t0 < 120:
        loser = next((p for p in procs.values() if p.poll() is not None), None)
        time.sleep(0.05)
    assert loser is not None and loser.returncode == 2, (loser and loser.stderr.read())
    refused_after = time.time() - t0
    winner = procs[a.pid if loser is b else b.pid]
    err = loser.stderr.read()
    assert "Traceback" not in err and f"is in use by pid {winner.pid} on " in err, err
    assert winner.poll() is None, "the second writer must be refused while the first still runs"
    assert refused_after < 60
    w_out, w_err = winner.communicate()
    assert winner.returncode == 0, w_err[-3000:]
    assert not list(same.rglob(".*tmp-*"))  # no stray partial writes
    lone = tmp_path / "lone"
    p = subprocess.run([sys.executable, str(REPO / "run_em.py"), *argv(lone)], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (same / "policy" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len((lone / "policy" / "metrics.jsonl").read_text().splitlines())
    assert artifacts(same) == {k: v.replace(b"/lone", b"/same") for k, v in artifacts(lone).items()}


def test_a_stage_into_a_live_run_names_the_run(inputs, tmp_path):
    run = tmp_path / "run"
    live = _start(args(inputs, run), script=REPO / "tests" / "tools" / "at_stage.py", pre=["sleep:60", "splits"])
    try:
        assert "holding after splits" in live.stdout.readline() + live.stdout.readline()
        before = tree_hash(run)
        code, _, err = cli(run_em.main, ["dpo", "--policy", str(inputs / "policy"), "--pairs",
                                         str(inputs / "prompts.jsonl"), "--out", str(run / "iter1"),
                                         "--preset", "tiny"], tmp_path)
        assert code == 2 and "Traceback" not in err, err
        assert f"inside {run}, which is in use by pid {live.pid} on " in err, err
        assert "belongs to another run" not in err
        assert tree_hash(run) == before
    finally:
        live.kill()
        live.wait()


def test_a_user_error_under_torchrun_is_printed_once(inputs, reference, tmp_path):
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(REPO / "run_em.py"), "dpo", "--policy", str(inputs / "policy"), "--pairs",
                        str(reference / "iter1" / "pairs.jsonl"), "--out", str(tmp_path / "dpo"),
                        "--preset", "tiny", "--dpo.batch_size", "2", "--dpo.micro_batch_size", "2"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    errors = [x for x in (p.stdout + p.stderr).splitlines() if "error: " in x and "Fix:" in x]
    assert len(errors) == 1 and "world size (2)" in errors[0], p.stderr[-3000:]
    assert "mt/train.py" not in p.stderr  # torchrun's agent prints its own traceback, ours none


# every command that writes into a directory holds it: a second writer refused at once, naming the
# first, and the first's output what a lone run writes. The first is held right after its lock is
# taken (tests/tools/held.py), the second runs through its exit path in a forked child.
TINY = ["--preset", "tiny", "--em.keep_truncated", "true"]


def _writers(d, ins, ref):
    """name: (script, its main, argv, the file a finished first writer must equal byte for byte;
    None: a long command, stopped once the second is refused)."""
    it = ref / "iter1"
    return {
        "sample": ("run_em.py", run_em.main, ["sample", "--model", str(ins / "policy"), "--prompts",
                   str(ref / "splits" / "D_1.jsonl"), "--out", str(d / "samples.jsonl"), "--stream",
                   "iter1/e-step", *TINY], it / "samples.jsonl"),
        "score": ("run_em.py", run_em.main, ["score", "--rm", str(ins / "rm"), "--samples",
                  str(it / "samples.jsonl"), "--out", str(d / "scores.jsonl"), *TINY], it / "scores.jsonl"),
        "pairs": ("run_em.py", run_em.main, ["pairs", "--samples", str(it / "samples.jsonl"), "--scores",
                  str(it / "scores.jsonl"), "--out", str(d / "pairs.jsonl"), *TINY], it / "pairs.jsonl"),
        "filter": ("run_em.py", run_em.main, ["filter", "--pseudo_pairs", str(it / "pseudo_pairs.jsonl"),
                   "--out", str(d / "pseudo_pairs.jsonl"), *TINY], it / "pseudo_pairs.jsonl"),
        "sandbox_report": ("eval/sandbox_report.py", sandbox_report.main,
                           ["--seeds", "0", "--variants", "mutual-taught", "--out", str(d)], None),
        "sandbox_calibrate": ("eval/sandbox_calibrate.py", sandbox_calibrate.main,
                              ["--out", str(d), "--result", str(d / "calibration.json")], None),
        "soak": ("eval/soak.py", soak.main, ["--trials", "1", "--args", " ".join(args(ins, d)[:-4]),
                 "--out", str(d)], None),
        "winrate": ("eval/winrate.py", winrate.main, ["--rm", str(ins / "rm"), "--new_policy", str(ins / "policy"),
                    "--old_policy", str(ins / "policy"), "--prompts", str(ref / "splits" / "D_1.jsonl"),
                    "--samples_dir", str(d), "--out", str(d.parent / "wr.json"), "--sampling.max_new_tokens",
                    "8"], None),
    }


@pytest.mark.parametrize("name", ["sample", "score", "pairs", "filter", "sandbox_report",
                                  "sandbox_calibrate", "soak", "winrate"])
def test_a_second_writer_is_refused_naming_the_first(name, inputs, reference, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    d = d.resolve()  # as the lock's message names it
    (d / "earlier.txt").write_text("written before\n")  # soak clears its --out: not under another's
    script, main, argv, lone = _writers(d, inputs, reference)[name]
    release = tmp_path / "release"
    first = _start([str(release), str(REPO / script), *argv], script=REPO / "tests" / "tools" / "held.py")
    try:
        held = next((x for x in first.stdout if x.startswith("holding ")), "")
        assert held.strip() == f"holding {d}", first.stderr.read()[-3000:]
        before, t0 = tree_hash(d), time.time()
        code, _, err = cli(main, argv, tmp_path)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert f"{d}: is in use by pid {first.pid} on " in err and "Fix:" in err, err
        assert time.time() - t0 < 30 and first.poll() is None
        assert tree_hash(d) == before, "the refused writer changed the first's directory"
        if lone is None:
            return
        release.touch()
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err[-3000:]
        assert (d / lone.name).read_bytes() == lone.read_bytes()
    finally:
        first.kill()
        first.communicate()


def _filter_into(out, env, reference):
    return subprocess.run([sys.executable, str(REPO / "run_em.py"), "filter", "--pseudo_pairs",
                           str(reference / "iter1" / "pseudo_pairs.jsonl"), "--out", str(out), *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True)


def test_a_writer_s_own_children_write_inside_its_directory(reference, tmp_path):
    """eval/sandbox_report.py holds its --out and starts run_em.py runs inside it: its children may
    write into the directory and below it; a process it did not start may not."""
    d = tmp_path.resolve() / "held"

    def holder(_argv):
        lock_run_dir(d)
        own = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        stranger = {k: v for k, v in own.items() if k != ANCESTORS_ENV}
        runs = [_filter_into(d / "f.jsonl", own, reference), _filter_into(d / "sub" / "f.jsonl", own, reference),
                _filter_into(d / "g.jsonl", stranger, reference)]
        print(json.dumps([[p.returncode, p.stderr[-2000:]] for p in runs]))
    code, out, err = cli(holder, [], tmp_path)
    assert code == 0, err[-3000:]
    (same, e1), (below, e2), (other, e3) = json.loads(out)
    assert same == 0 and below == 0, (e1, e2)
    assert other == 2 and f"{d}: is in use by pid " in e3 and "Traceback" not in e3, e3
    assert (d / "f.jsonl").is_file() and (d / "sub" / "f.jsonl").is_file() and not (d / "g.jsonl").exists()
