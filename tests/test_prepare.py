"""python -m mt.prepare: UltraFeedback rows of both forms (openbmb, binarized), as JSONL and parquet,
-> the prompt file run_em.py reads; every count checked against a hand count of the rows below."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt import chat
from mt.config import ConfigError
from mt.data import DataError, read_prompts
from mt.prepare import main, normalise, text_id

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64  # --sampling.max_prompt_tokens in these tests
LONG = "Explain why the sky is blue, and why sunsets are red. " * 12  # far over LIMIT tokens


def chat_of(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": t} for r, t in zip(roles, turns)]


# HuggingFaceH4/ultrafeedback_binarized rows (train_prefs / test_prefs columns)
BINARIZED = [
    {"prompt_id": "a1", "prompt": "What is two plus two?",
     "messages": chat_of("What is two plus two?", "Four."), "score_chosen": 8.0},
    {"prompt_id": "a2", "prompt": "Write a short poem about the sea.",
     "messages": chat_of("Write a short poem about the sea.", "Blue."), "score_chosen": 7.0},
    # the same text up to whitespace: merged into a1
    {"prompt_id": "a3", "prompt": "  What is two plus\ntwo?  ",
     "messages": chat_of("What is two plus two?", "4"), "score_chosen": 6.0},
    {"prompt_id": "a4", "prompt": "", "messages": chat_of("", "?"), "score_chosen": 1.0},  # empty
    {"prompt_id": "a5", "prompt": LONG, "messages": chat_of(LONG, "Rayleigh."),  # over-length
     "score_chosen": 9.0},
    # a multi-turn chat with no prompt cell: its first user turn is the prompt
    {"prompt_id": "a6", "prompt": None,
     "messages": chat_of("How are you today?", "Fine.", "And yesterday?", "Also fine."),
     "score_chosen": 5.0},
]
# openbmb/UltraFeedback rows: no id, the prompt in `instruction`
OPENBMB = [
    {"source": "evol_instruct", "instruction": "Write a short poem about the sea.",  # dup of a2
     "completions": [{"model": "m", "response": "Waves."}]},
    {"source": "ultrachat", "instruction": "Hello world, how are you?", "completions": []},
    {"source": "sharegpt", "instruction": "   ", "completions": []},  # empty
    {"source": "flan", "instruction": "Hello  world, how are you?\n", "completions": []},  # dup
    {"source": "false_qa", "instruction": "Why is the quick brown fox lazy?", "completions": []},
]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, inputs, *extra, policy=None):
    out = tmp_path / "prompts.jsonl"
    argv = ["--inputs", ",".join(map(str, inputs)), "--out", str(out),
            "--sampling.max_prompt_tokens", str(LIMIT), *extra]
    if policy is not None:
        argv += ["--policy", str(policy)]
    summary = main(argv)
    dropped = [json.loads(line) for line in (tmp_path / "prompts.jsonl.dropped.jsonl").open()]
    saved = json.loads((tmp_path / "prompts.jsonl.prepare.json").read_text())
    return out, summary, saved, dropped


@pytest.mark.parametrize("ext_b,ext_o", [(".parquet", ".jsonl"), (".jsonl", ".parquet")])
def test_both_forms_counted_by_hand(tmp_path, tiny_llama_dir, capsys, ext_b, ext_o):
    b = write(tmp_path / f"train_prefs{ext_b}", BINARIZED)
    o = write(tmp_path / f"ultrafeedback{ext_o}", OPENBMB)
    out, summary, saved, dropped = run(tmp_path, [b, o], policy=tiny_llama_dir)
    tok = chat.load_tokenizer(tiny_llama_dir)

    # the output is what run_em.py reads, in input order, with the dataset's ids or the text hash
    prompts = read_prompts(out)
    hello = text_id("Hello world, how are you?")
    assert [p["prompt_id"] for p in prompts] == ["a1", "a2", "a6", hello, text_id(OPENBMB[4]["instruction"])]
    assert [p["prompt"][0]["content"] for p in prompts][:3] == [
        "What is two plus two?", "Write a short poem about the sea.", "How are you today?"]
    assert all(len(chat.encode_prompt(tok, p["prompt"])) <= LIMIT for p in prompts)

    # hand counts: binarized 6 rows = 3 kept + 1 duplicate + 1 empty + 1 over-length (1 chat cut);
    # openbmb 5 rows = 2 kept + 2 duplicates + 1 empty
    zero = {"dropped_id_conflict": 0}
    assert saved["files"][str(b)] == {"rows": 6, "kept": 3, "dropped_empty": 1, "dropped_duplicate": 1,
                                      "dropped_over_length": 1, "over_length": 1, "multi_turn": 1, **zero}
    assert saved["files"][str(o)] == {"rows": 5, "kept": 2, "dropped_empty": 1, "dropped_duplicate": 2,
                                      "dropped_over_length": 0, "over_length": 0, "multi_turn": 0, **zero}
    assert saved["totals"] == {"rows": 11, "kept": 5, "dropped_empty": 2, "dropped_duplicate": 3,
                               "dropped_over_length": 1, "over_length": 1, "multi_turn": 1, **zero}
    assert saved["kept"] == 5 and saved["dropped"] == 6 and saved == json.loads(json.dumps(summary))
    assert saved["settings"]["max_prompt_tokens"] == LIMIT and saved["settings"]["over_length"] == "drop"

    # every dropped row: file, row number (a JSONL file's line), id, reason, tokens
    got = [(Path(d["file"]).name, d["row"], d["prompt_id"], d["reason"]) for d in dropped]
    assert got == [(b.name, 3, "a3", "duplicate"), (b.name, 4, "a4", "empty"), (b.name, 5, "a5", "over_length"),
                   (o.name, 1, "a2", "duplicate"), (o.name, 3, None, "empty"), (o.name, 4, hello, "duplicate")]
    over = dropped[2]
    assert over["tokens"] == len(chat.encode_prompt(tok, [{"role": "user", "content": LONG}])) > LIMIT
    assert dropped[0]["duplicate_of"] == "a1" and dropped[3]["first_at"].startswith(str(b))

    text = capsys.readouterr().out
    assert f"5 prompts -> {out}" in text and "11 rows -> 5 prompts" in text
    assert "1 over_length" in text and "1 chats cut to their first user turn" in text


def test_keep_over_length_and_stable_output(tmp_path, tiny_llama_dir):
    b = write(tmp_path / "train_prefs.parquet", BINARIZED)
    out, _, saved, dropped = run(tmp_path, [b], "--prepare.over_length", "keep", policy=tiny_llama_dir)
    assert [p["prompt_id"] for p in read_prompts(out)] == ["a1", "a2", "a5", "a6"]
    assert saved["totals"]["over_length"] == 1 and saved["totals"]["dropped_over_length"] == 0
    assert [d["reason"] for d in dropped] == ["duplicate", "empty"]
    # deterministic: a second run writes the same bytes
    first = out.read_bytes()
    run(tmp_path, [b], "--prepare.over_length", "keep", policy=tiny_llama_dir)
    assert out.read_bytes() == first


def test_ids_are_a_hash_of_the_normalised_text():
    assert normalise("  a \n b\t") == "a b"
    assert text_id("Hello  world\n") == text_id("Hello world") == text_id(" Hello world ")
    assert text_id("Hello world") != text_id("hello world") and len(text_id("x")) == 16


def test_without_policy(tmp_path):
    o = write(tmp_path / "uf.jsonl", OPENBMB)
    with pytest.raises(ConfigError, match="missing --policy"):
        run(tmp_path, [o])
    out, _, saved, _ = run(tmp_path, [o], "--prepare.over_length", "keep")  # no length check
    assert len(read_prompts(out)) == 3 and saved["settings"]["policy"] is None


def bad_inputs(tmp_path) -> dict:
    cut = tmp_path / "cut.parquet"
    write(cut, BINARIZED)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    no_prompt = tmp_path / "no_prompt.jsonl"
    write(no_prompt, [OPENBMB[1], {"source": "x", "completions": []}])
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text(json.dumps(OPENBMB[1]) + "\n{\"instruction\": \"cut\n")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"instruction": "ok"}\n{"instruction": "bad \\ud800"}\n')
    return {  # file -> what the error must say
        surrogate: "surrogate.jsonl:2: field 'instruction' holds a lone UTF-16 surrogate",
        tmp_path / "missing.jsonl": "missing.jsonl: no such file",
        cut: "cut.parquet: not a readable parquet file",
        no_prompt: "no_prompt.jsonl:2: no prompt field",
        not_json: "not_json.jsonl:2: invalid JSON",
    }


def test_bad_input_names_file_and_row_and_keeps_the_old_output(tmp_path):
    o = write(tmp_path / "uf.jsonl", OPENBMB)
    out, *_ = run(tmp_path, [o], "--prepare.over_length", "keep")
    good = {p.name: p.read_bytes() for p in tmp_path.glob("prompts.jsonl*")}
    for path, msg in bad_inputs(tmp_path).items():
        with pytest.raises(DataError, match="Fix: ") as e:
            run(tmp_path, [o, path], "--prepare.over_length", "keep")
        assert msg in str(e.value)
        # nothing half-written: the previous output and its reports are untouched, no temp files left
        assert {p.name: p.read_bytes() for p in tmp_path.glob("prompts.jsonl*")} == good
    assert not list(tmp_path.glob(".prompts.jsonl*"))


def test_command_line_user_error(tmp_path):
    """The command itself: a user error is one `error: ...` paragraph and exit status 2."""
    no_prompt = next(p for p in bad_inputs(tmp_path) if p.name == "no_prompt.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "mt.prepare", "--inputs", str(no_prompt), "--out",
                        str(tmp_path / "p.jsonl"), "--prepare.over_length", "keep"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert "no_prompt.jsonl:2: no prompt field" in p.stderr and "'instruction'" in p.stderr
    assert not (tmp_path / "p.jsonl").exists()
