"""Every command of the README's evaluation and publishing sections, run as written on a tiny finished run.

The commands are read from the markdown itself: each ```bash block right after a
`<!-- tested: tests/test_readme_commands.py -->` line in README.md and eval/README.md. The only changes
are SUBSTITUTE (a path the README names -> a tiny fixture) and EXTRA_FLAGS (the tiny model's short
answers); a command that drifts from the code fails here. Commands that need the network, an API key
or 8 GPUs are listed in SKIP and not run.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- tested: tests/test_readme_commands.py -->"
DOCS = [REPO / "README.md", REPO / "eval" / "README.md"]
# command prefix -> why it is not run; each must match a command (so the list stays true)
SKIP = {
    "torchrun --nproc_per_node 8": "8 processes (the one-process command beside it is run)",
    "pip install alpaca-eval": "network: installs a package, sets an API key",
    "alpaca_eval evaluate": "network: GPT-4 judge (OpenAI API)",
    "cd arena-hard-auto": "network: GPT-4 judge (OpenAI API)",
    "hf upload": "network: the Hugging Face Hub",
}
# the tiny model answers in 8 tokens, not 4,096
EXTRA_FLAGS = {"eval/generate.py": ["--sampling.max_new_tokens", "8"],
               "eval/winrate.py": ["--sampling.max_new_tokens", "8"]}


def marked_blocks(path: Path) -> list[str]:
    """The ```bash blocks that follow the marker line (indented blocks in lists too)."""
    blocks = re.findall(re.escape(MARK) + r"\n\s*```bash\n(.*?)\n\s*```", path.read_text(), re.S)
    assert blocks, f"{path}: no tested blocks"
    return blocks


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def substitute(token: str, subs: dict[str, Path]) -> str:
    """A path the README names -> its fixture (each item of a comma-separated list too)."""
    if "," in token:
        return ",".join(substitute(t, subs) for t in token.split(","))
    for key, val in subs.items():
        k = key.rstrip("/")
        if token.rstrip("/") == k or token.startswith(k + "/"):
            return str(val) + token[len(k):]
    return token


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny finished run at runs/mt, its Llama-3-named base models (with a license), and benchmark
    files of a few rows each."""
    root = tmp_path_factory.mktemp("readme")
    policy, rm = root / "meta-llama-3-8b-instruct", root / "fsfairx-llama3-rm-v0.1"
    make_tiny_checkpoint(policy, "llama", "lm", seed=0, tokenizer_style="chatml")
    make_tiny_checkpoint(rm, "llama", "score", seed=1, tokenizer_style="chatml")
    for d in (policy, rm):
        (d / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT (a stand-in for the test)\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello {i} world"}) + "\n"
                               for i in range(32)))
    run = root / "runs" / "mt"
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "run_em.py", "--preset", "tiny", "--policy", str(policy), "--rm",
                        str(rm), "--prompts", str(prompts), "--out", str(run), "--em.keep_truncated", "true"],
                       cwd=REPO, env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (root / "runs" / "iterative-dpo").mkdir()  # a run not evaluated yet: its rows are "-"
    (root / "base").mkdir()
    sections = ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-python"]
    bench = root / "reward-bench-filtered.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": f"good answer {i}",
                                         "rejected": f"bad {i}", "subset": s, "id": i}) + "\n"
                             for i, s in enumerate(sections)))
    alpaca = root / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"dataset": "helpful_base", "instruction": "What is the sea?",
                                   "output": "x", "generator": "gpt4"},
                                  {"dataset": "koala", "instruction": "Write a poem.", "output": "y",
                                   "generator": "gpt4"}]))
    arena = root / "arena-hard-auto" / "data" / "arena-hard-v0.1" / "question.jsonl"
    arena.parent.mkdir(parents=True)
    arena.write_text("".join(json.dumps({"uid": f"q{i}", "category": "arena-hard-v0.1",
                                         "prompt": f"Explain {i}."}) + "\n" for i in range(2)))
    return root


def test_every_readme_command_runs(fixtures):
    root = fixtures
    subs = {"runs": root / "runs", "export": root / "export", "base": root / "base",
            "reward-bench-filtered.jsonl": root / "reward-bench-filtered.jsonl",
            "alpaca_eval.json": root / "alpaca_eval.json", "arena-hard-auto": root / "arena-hard-auto",
            "meta-llama-3-8b-instruct": root / "meta-llama-3-8b-instruct",
            "test.jsonl": root / "prompts.jsonl"}
    before = set(os.listdir(REPO))
    ran, skipped, seen = [], {k: [] for k in SKIP}, set()
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for doc in DOCS:
        for block in marked_blocks(doc):
            for cmd in commands(block):
                skip = [k for k in SKIP if cmd.startswith(k)]
                if skip:
                    skipped[skip[0]].append(cmd)
                    continue
                argv = shlex.split(cmd, comments=True)
                assert argv[0] == "python" and argv[1].startswith("eval/"), f"{doc.relative_to(REPO)}: not runnable: {cmd}"
                if cmd in seen:  # README.md and eval/README.md show some commands twice
                    continue
                seen.add(cmd)
                argv = [sys.executable, argv[1], *(substitute(t, subs) for t in argv[2:]),
                        *EXTRA_FLAGS.get(argv[1], [])]
                p = subprocess.run(argv, cwd=REPO, env=e, capture_output=True, text=True)
                assert p.returncode == 0, f"{doc.relative_to(REPO)}: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
                if "--out" in argv:
                    assert Path(argv[argv.index("--out") + 1]).exists(), cmd
                ran.append((cmd, p.stdout))
    assert all(skipped.values()), {k: v for k, v in skipped.items() if not v}  # SKIP names real commands
    assert set(os.listdir(REPO)) == before  # every output went to the fixtures
    scripts = {shlex.split(c)[1] for c, _ in ran}
    assert scripts == {"eval/rewardbench.py", "eval/generate.py", "eval/tables.py", "eval/winrate.py",
                       "eval/export.py"}

    run = root / "runs" / "mt"
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["policy"]  # relative to the run, e.g. iter2/policy/ckpt-1
    out = dict(ran)
    rb = next(o for c, o in ran if c.startswith("python eval/rewardbench.py"))
    assert f"the final RM is {run / 'iter2' / 'rm' / 'final'}" in rb
    gen = next(o for c, o in ran if "--format alpacaeval" in c)
    assert f"the selected policy is {run / chosen}" in gen
    answers = json.loads((run / "eval" / "alpacaeval" / "model_outputs.json").read_text())
    assert [a["instruction"] for a in answers] == ["What is the sea?", "Write a poem."]
    assert {a["generator"] for a in answers} == {"mt"}  # named after the run
    assert (root / "arena-hard-auto" / "data" / "arena-hard-v0.1" / "model_answer" / "mt.jsonl").is_file()
    table = (root / "runs" / "tables.md").read_text()
    rb_json = json.loads((run / "eval" / "rewardbench.json").read_text())
    assert f"| Mutual-Taught | {rb_json['sections']['Chat']:.1f} |" in table
    card = (root / "export" / "Llama-3-8B-Instruct-MT" / "README.md").read_text()
    assert "Built with Meta Llama 3." in card and f"`{chosen}`" in card
    assert (root / "export" / "Llama-3-8B-Instruct-MT-RM" / "LICENSE").is_file()
    assert "Table 2" not in card and "| Chat |" not in card  # the policy's card shows Table 1's columns
    rm_card = (root / "export" / "Llama-3-8B-Instruct-MT-RM" / "README.md").read_text()
    assert f"| Llama-3-8B-Instruct-MT-RM | {rb_json['sections']['Chat']:.1f} |" in rm_card
    print("skipped:", json.dumps(skipped, indent=1))
    assert out
