"""Tests for mt/data.py: one malformed-row case per kind with its exact location, skip mode, round-trips,
atomic writes, UltraFeedback-binarized rows, JSON-array and parquet input, padding vs a naive loop."""

import hashlib
import json
import os
import sys
import types

import pytest
import torch

from mt.data import (DataError, ReadReport, pad_sequences,
                     prompt_hash, read_pairs, read_prompts, read_samples, read_scores, write_jsonl)

READERS = {"prompts": read_prompts, "pairs": read_pairs, "samples": read_samples, "scores": read_scores}
GOOD = {  # one valid row per kind, used as line 1 so a bad line 2 is located exactly
    "prompts": '{"prompt_id": "p0", "prompt": "Hello"}',
    "pairs": '{"prompt_id": "p0", "prompt": "Q", "chosen": "good", "rejected": "bad"}',
    "samples": '{"prompt_id": "p0", "prompt": "Q", "responses": ["a", ""], "finish_reasons": ["stop", "length"], '
               '"num_tokens": [1, 0]}',
    "scores": '{"prompt_id": "p0", "scores": [0.5, -1]}',
}
SAMPLE = {"prompt_id": "p1", "prompt": "Q", "responses": ["a", "b"], "finish_reasons": ["stop", "stop"],
          "num_tokens": [3, 4]}
PAIR = {"prompt_id": "p1", "prompt": "Q", "chosen": "yes", "rejected": "no"}


def _bad_sample(**kw):
    return json.dumps({**SAMPLE, **kw})


def _bad_pair(**kw):
    return json.dumps({**PAIR, **kw})


# (case id, kind, bad line 2, field named in the error (None: whole row), fragment of the problem)
CORPUS = [
    ("invalid_json", "prompts", '{"prompt_id": "p1", "prompt": "x"', None,  # column 34: just past the end
     "invalid JSON (Expecting ',' delimiter at column 34)"),
    ("not_object", "prompts", '["p1", "x"]', None, "row is a JSON array, not an object"),
    ("missing_prompt", "prompts", '{"prompt_id": "p1"}', "prompt", "missing"),
    ("prompt_wrong_type", "prompts", '{"prompt_id": "p1", "prompt": 7}', "prompt", "got number"),
    ("whitespace_prompt", "prompts", '{"prompt_id": "p1", "prompt": "  \\n\\t "}', "prompt", "whitespace only"),
    ("empty_content", "prompts", '{"prompt_id": "p1", "prompt": [{"role": "user", "content": ""}]}',
     "prompt[0].content", "is empty"),
    ("unknown_role", "prompts", '{"prompt_id": "p1", "prompt": [{"role": "human", "content": "hi"}]}',
     "prompt[0].role", "unknown role 'human'"),
    ("missing_role", "prompts", '{"prompt_id": "p1", "prompt": [{"content": "hi"}]}', "prompt[0].role", "missing"),
    ("ends_with_assistant", "prompts",
     '{"id": "p1", "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "prompt", "last message has role 'assistant'"),
    ("id_wrong_type", "prompts", '{"id": ["p1"], "prompt": "x"}', "id", "must be a string, got array"),
    ("bool_id", "prompts", '{"prompt_id": true, "prompt": "x"}', "prompt_id", "got boolean"),
    ("duplicate_id", "prompts", '{"prompt_id": "p0", "prompt": "other"}', "prompt_id",
     "duplicate prompt for 'p0' (first at line 1)"),
    ("chosen_eq_rejected", "pairs", _bad_pair(rejected="yes"), "rejected", "identical to 'chosen'"),
    ("missing_chosen", "pairs", json.dumps({"prompt_id": "p1", "prompt": "Q", "rejected": "no"}), "chosen", "missing"),
    ("empty_chosen", "pairs", _bad_pair(chosen=" "), "chosen", "whitespace only"),
    ("nan_score", "pairs", _bad_pair()[:-1] + ', "chosen_score": NaN}', "chosen_score", "is nan (not finite)"),
    ("inf_score", "pairs", _bad_pair()[:-1] + ', "rejected_score": -Infinity}', "rejected_score", "not finite"),
    ("string_score", "pairs", _bad_pair(chosen_score="1.0"), "chosen_score", "must be a number, got string"),
    ("uf_no_assistant", "pairs", _bad_pair(chosen=[{"role": "user", "content": "Q"}]), "chosen",
     "no assistant message"),
    ("duplicate_pair", "pairs", _bad_pair(prompt_id="p0", prompt="Q", chosen="good", rejected="bad"), "prompt_id",
     "duplicate pair for 'p0'"),
    ("length_mismatch", "samples", _bad_sample(num_tokens=[3]), "num_tokens",
     "has length 1 but 'responses' has length 2"),
    ("bad_finish", "samples", _bad_sample(finish_reasons=["stop", "eos"]), "finish_reasons[1]", "is 'eos'"),
    ("negative_tokens", "samples", _bad_sample(num_tokens=[3, -1]), "num_tokens[1]", "is -1"),
    ("float_tokens", "samples", _bad_sample(num_tokens=[3.0, 4]), "num_tokens[0]", "is 3.0"),
    ("responses_not_list", "samples", _bad_sample(responses="a"), "responses", "must be an array, got string"),
    ("empty_responses", "samples", _bad_sample(responses=[], finish_reasons=[], num_tokens=[]), "responses",
     "empty array"),
    ("response_not_text", "samples", _bad_sample(responses=["a", None]), "responses[1]", "got null"),
    ("missing_prompt_id", "samples", json.dumps({k: v for k, v in SAMPLE.items() if k != "prompt_id"}), "prompt_id",
     "missing"),
    ("nan_in_scores", "scores", '{"prompt_id": "p1", "scores": [1.0, NaN]}', "scores[1]", "not finite"),
    ("inf_in_scores", "scores", '{"prompt_id": "p1", "scores": [Infinity]}', "scores[0]", "is inf"),
    ("bool_in_scores", "scores", '{"prompt_id": "p1", "scores": [true]}', "scores[0]", "got boolean"),
    ("scores_not_list", "scores", '{"prompt_id": "p1", "scores": 1.0}', "scores", "must be an array, got number"),
    ("duplicate_scores", "scores", '{"prompt_id": "p0", "scores": [1]}', "prompt_id", "duplicate row for 'p0'"),
]


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize("case,kind,line,field,problem", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_row_names_file_line_field(tmp_path, case, kind, line, field, problem):
    path = _write(tmp_path / f"{case}.jsonl", GOOD[kind] + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        READERS[kind](path)
    msg = str(e.value)
    prefix = f"{path}:2:" + (f" field '{field}':" if field else "")
    assert msg.startswith(prefix), msg
    assert problem in msg, msg
    assert ". Fix: " in msg and not msg.endswith("Fix: "), msg  # every error says what to change


def test_invalid_utf8_names_its_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", GOOD["prompts"].encode() + b'\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: invalid UTF-8 at byte 15\. Fix: re-save"):
        read_prompts(path)


def test_blank_lines_and_bom_are_not_rows(tmp_path):
    path = _write(tmp_path / "p.jsonl", b"\xef\xbb\xbf" + GOOD["prompts"].encode() + b"\n\n  \r\n")
    assert read_prompts(path) == [{"prompt_id": "p0", "prompt": [{"role": "user", "content": "Hello"}]}]


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = _write(tmp_path / "empty.jsonl", text)
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty \(no rows\)\. Fix:"):
        read_prompts(path)
    with pytest.raises(DataError, match="file is empty"):
        read_prompts(path, on_error="skip")


def test_missing_path_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file\. Fix: check the path"):
        read_prompts(tmp_path / "nope.jsonl")
    path = _write(tmp_path / "prompts.csv", "prompt\nhi\n")
    with pytest.raises(DataError, match=r"prompts\.csv: unknown extension '\.csv'\. Fix: use one of \.jsonl, \.json"):
        read_prompts(path)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        read_prompts(_write(tmp_path / "p.jsonl", GOOD["prompts"]), on_error="ignore")


# ---- skip mode

def test_skip_mode_counts_and_locations(tmp_path):
    lines = [GOOD["prompts"], "{oops", '{"prompt": "kept without id"}', '{"prompt_id": "p3", "prompt": ""}',
             '{"prompt_id": "p4", "prompt": [{"role": "user", "content": "ok"}]}', '{"prompt_id": "p0", "prompt": "d"}']
    path = _write(tmp_path / "mixed.jsonl", "\n".join(lines) + "\n")
    before = path.read_bytes()
    report = ReadReport()
    prompts = read_prompts(path, on_error="skip", report=report)
    assert [p["prompt_id"] for p in prompts] == ["p0", prompt_hash([{"role": "user", "content": "kept without id"}]), "p4"]
    assert report.kept == 3 and len(report.skipped) == 3
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    assert "invalid JSON" in report.skipped[0] and "field 'prompt'" in report.skipped[1]
    assert "duplicate prompt for 'p0' (first at line 1)" in report.skipped[2]
    assert str(report).startswith(f"{path}: kept 3 rows, skipped 3\n  {path}:2: invalid JSON")
    assert path.read_bytes() == before  # readers never write
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):  # the default still raises
        read_prompts(path)


def test_skip_mode_without_report_warns_and_all_bad_raises(tmp_path):
    path = _write(tmp_path / "s.jsonl", GOOD["scores"] + '\n{"prompt_id": "x", "scores": [NaN]}\n')
    with pytest.warns(UserWarning, match=r"s\.jsonl:2: field 'scores\[0\]': is nan"):
        assert len(read_scores(path, on_error="skip")) == 1
    bad = _write(tmp_path / "bad.jsonl", '{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: no valid rows \(all 2 skipped\)"):
        read_scores(bad, on_error="skip")


# ---- round trips

ROUND_TRIP = [
    ("prompts", read_prompts, [{"prompt_id": "a", "prompt": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "héllo ✓"}]},
                               {"prompt_id": "b", "prompt": [{"role": "user", "content": "x\ny"}]}]),
    ("pairs", read_pairs, [{"prompt_id": "a", "prompt": [{"role": "user", "content": "Q"}], "chosen": "c",
                            "rejected": "r", "chosen_score": 1.5, "rejected_score": -0.25,
                            "delta_r": 0.1, "kept": True, "reason": None},  # other fields kept as they are
                           {"prompt_id": "b", "prompt": [{"role": "user", "content": "Q"}], "chosen": "c2",
                            "rejected": "r2"}]),  # no score keys when the row has no scores
    ("samples", read_samples, [{"prompt_id": "a", "prompt": [{"role": "user", "content": "Q"}],
                                "responses": ["x", ""], "finish_reasons": ["stop", "length"], "num_tokens": [2, 0]}]),
    ("scores", read_scores, [{"prompt_id": "a", "scores": [0.1, -3.0, 1e-30]}, {"prompt_id": "b", "scores": [2.0]}]),
]


@pytest.mark.parametrize("kind,reader,rows", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_round_trip(tmp_path, kind, reader, rows):
    path = tmp_path / "sub" / f"{kind}.jsonl"
    write_jsonl(path, rows)  # a row is a plain dict, from reader to writer
    got = reader(path)
    assert got == rows and all(type(r) is dict for r in got)
    assert [json.loads(l) for l in path.read_text().splitlines()] == rows
    write_jsonl(path, got)  # what a reader returns is written back unchanged
    assert [json.loads(l) for l in path.read_text().splitlines()] == rows and reader(path) == rows


def test_pair_named_fields_win_over_raw_keys_and_extras_are_kept(tmp_path):
    # the named fields of the reader's dict are the parsed values, never the raw keys they came from
    # (a chat "chosen", "id", "score_chosen", "messages"); a null score gives no score key; any other field is kept
    row = {"id": 7, "prompt": "Q", "rejected": "r", "score_chosen": 2, "rejected_score": None, "eps_t": 0.5,
           "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "c"}],
           "messages": [{"role": "user", "content": "other"}]}
    path = _write(tmp_path / "pairs.jsonl", json.dumps(row) + "\n")
    [pair] = read_pairs(path)
    assert pair == {"prompt_id": "7", "prompt": [{"role": "user", "content": "Q"}], "chosen": "c", "rejected": "r",
                    "chosen_score": 2.0, "eps_t": 0.5}
    assert pair["chosen"] == "c" and pair["eps_t"] == 0.5 and "rejected_score" not in pair


# ---- atomic writes

def test_atomic_write_keeps_previous_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "scores.jsonl"
    write_jsonl(path, [{"prompt_id": "old", "scores": [1.0]}])
    before = path.read_bytes()
    rows = [{"prompt_id": "a", "scores": [1.0]}, {"prompt_id": "b", "scores": [2.0]},
            {"prompt_id": "c", "scores": [object()]}, {"prompt_id": "d", "scores": [4.0]}]
    with pytest.raises(TypeError):
        write_jsonl(path, rows)
    with pytest.raises(ValueError):  # NaN is not JSON: refused instead of written
        write_jsonl(path, [{"prompt_id": "a", "scores": [float("nan")]}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["scores.jsonl"]  # no temp file left behind
    assert read_scores(path) == [{"prompt_id": "old", "scores": [1.0]}]


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.dirname(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    assert events[:2] == ["fsync", ("replace", str(tmp_path))]  # temp file in the same directory


# ---- UltraFeedback-binarized rows, JSON arrays, parquet

UF_ROW = {  # shape of HuggingFaceH4/ultrafeedback_binarized rows
    "prompt": "Write a haiku.", "prompt_id": "9f3a",
    "chosen": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Old pond..."}],
    "rejected": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "No."}],
    "messages": [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Old pond..."}],
    "score_chosen": 8.5, "score_rejected": 3.0, "source": "evol_instruct",
}


def test_ultrafeedback_binarized_rows(tmp_path):
    path = _write(tmp_path / "uf.jsonl", json.dumps(UF_ROW) + "\n")
    user = [{"role": "user", "content": "Write a haiku."}]
    assert read_prompts(path) == [{"prompt_id": "9f3a", "prompt": user}]
    assert read_pairs(path) == [{"prompt_id": "9f3a", "prompt": user, "chosen": "Old pond...", "rejected": "No.",
                                 "chosen_score": 8.5, "rejected_score": 3.0, "source": "evol_instruct"}]
    # without "prompt" the prompt comes from the first user turn of "messages" / the turns before the chosen answer
    sys_user = [{"role": "system", "content": "S"}] + user
    row = {k: v for k, v in UF_ROW.items() if k != "prompt"}
    row["messages"] = sys_user + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "more"}]
    row["chosen"] = sys_user + [{"role": "assistant", "content": "Old pond..."}]
    path = _write(tmp_path / "uf2.jsonl", json.dumps(row) + "\n")
    assert read_prompts(path) == [{"prompt_id": "9f3a", "prompt": sys_user}]
    assert read_pairs(path)[0]["prompt"] == sys_user


def test_prompt_hash_id_for_rows_without_id(tmp_path):
    rows = [{"prompt": "héllo"}, {"prompt": [{"role": "user", "content": "b"}]}]
    path = _write(tmp_path / "p.json", json.dumps(rows))
    prompts = read_prompts(path)
    assert prompts[0]["prompt_id"] == hashlib.sha1("héllo".encode()).hexdigest()[:16]
    assert prompts[1]["prompt_id"] == hashlib.sha1(b"b").hexdigest()[:16]  # same id as the plain string "b"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]
    assert prompt_hash(chat) != prompts[1]["prompt_id"] and prompt_hash(chat) == prompt_hash(list(chat))


def test_json_array_input(tmp_path):
    rows = [{"id": 1, "prompt": "a"}, {"id": "2", "prompt": "b"}, {"id": 3, "prompt": ""}]
    path = _write(tmp_path / "p.json", json.dumps(rows, indent=2))
    with pytest.raises(DataError, match=r"p\.json\[row 3\]: field 'prompt': is empty"):
        read_prompts(path)
    report = ReadReport()
    assert [p["prompt_id"] for p in read_prompts(path, on_error="skip", report=report)] == ["1", "2"]  # int ids become str
    assert report.skipped[0].startswith(f"{path}[row 3]:")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON .* Fix: the file must be one JSON array"):
        read_prompts(_write(tmp_path / "bad.json", '[\n {"prompt": "a"},\n {"prompt" "b"}\n]'))
    with pytest.raises(DataError, match=r"obj\.json: top level is a JSON object\. Fix: make it an array"):
        read_prompts(_write(tmp_path / "obj.json", '{"prompt": "a"}'))
    with pytest.raises(DataError, match=r"u\.json:2: invalid UTF-8"):
        read_prompts(_write(tmp_path / "u.json", b'[\n{"prompt": "\xff"}]'))


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # a None entry makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = _write(tmp_path / "p.parquet", b"PAR1")
    with pytest.raises(DataError, match=r"p\.parquet: reading parquet needs pyarrow\. Fix: pip install pyarrow"):
        read_prompts(path)


def test_parquet_rows_are_located_by_row_index(tmp_path, monkeypatch):
    # a stand-in for pyarrow.parquet: checks our row handling on the parquet path even without pyarrow
    rows = [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": None}]
    fake = types.SimpleNamespace(read_table=lambda p: types.SimpleNamespace(to_pylist=lambda: rows))
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake)
    path = _write(tmp_path / "p.parquet", b"PAR1")
    with pytest.raises(DataError, match=r"p\.parquet\[row 2\]: field 'prompt': must be a string or an array"):
        read_prompts(path)


def test_cut_parquet_file_is_a_data_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"prompt_id": str(i), "prompt": "x" * i} for i in range(1, 50)]),
                   tmp_path / "p.parquet")
    cut = _write(tmp_path / "cut.parquet", (tmp_path / "p.parquet").read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable parquet file .*Fix: download"):
        read_prompts(cut)


def test_parquet_with_real_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")  # optional dependency; the error path above always runs
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "a", "prompt": "x"}]), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == [{"prompt_id": "a", "prompt": [{"role": "user", "content": "x"}]}]


# ---- padding / collation vs a naive loop

@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_matches_naive_loop(side):
    g = torch.Generator().manual_seed(0)
    lens = [int(n) for n in torch.randint(0, 9, (7,), generator=g)] + [8]
    seqs = [torch.randint(1, 100, (n,), generator=g).tolist() for n in lens]
    ids, lengths = pad_sequences(seqs, pad_id=0, side=side)
    T = max(lens)
    naive_ids = []
    for s in seqs:
        pad = [0] * (T - len(s))
        naive_ids.append(s + pad if side == "right" else pad + s)
    assert ids.dtype == torch.long and ids.tolist() == naive_ids
    assert lengths.dtype == torch.long and lengths.tolist() == lens


def test_pad_id_equal_to_a_real_token():
    # pad == eos: lengths count the tokens given, so a real token equal to pad_id is not taken for padding
    ids, lengths = pad_sequences([[5, 2], [2]], pad_id=2, side="left")
    assert ids.tolist() == [[5, 2], [2, 2]]
    assert lengths.tolist() == [2, 1]


def test_pad_errors():
    with pytest.raises(ValueError, match="side must be"):
        pad_sequences([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="at least one"):
        pad_sequences([], 0)
