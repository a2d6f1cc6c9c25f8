"""The prompt set D from a local copy of UltraFeedback, as one command; every decision counted.

    python -m mt.prepare --inputs train_prefs.parquet,test_prefs.parquet \\
        --policy meta-llama/Meta-Llama-3-8B-Instruct --out data/ultrafeedback.prompts.jsonl

Reads `openbmb/UltraFeedback` rows (`instruction`, `source`, `completions`, ...) and
`HuggingFaceH4/ultrafeedback_binarized` rows (`prompt_id`, `prompt`, `messages`, ...), as .jsonl,
.json or .parquet, several files in the order given. Writes the prompt file `run_em.py --prompts`
reads ({"prompt_id", "prompt"}, mt/data.py read_prompts), in input order, with:
  - empty prompts dropped;
  - duplicates merged: the same text up to whitespace is one prompt, the first row's id kept;
  - prompts longer than --sampling.max_prompt_tokens under the policy's chat template (as
    run_em.py's preflight counts them, which refuses the whole run on one) dropped, or kept with
    --prepare.over_length keep;
  - ids: the dataset's `prompt_id` (or `id`), else sha256 of the whitespace-normalised text (16 hex),
    so the same prompt gets the same id on every run and machine.
Beside the output: OUT.prepare.json (counts per reason, per input file, and the settings) and
OUT.dropped.jsonl (every dropped row: file, row, id, reason, tokens). All three are written
atomically: a bad input leaves an existing output untouched.
"""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mt import chat, dist
from mt.config import ConfigError, SamplingConfig, opt, parse
from mt.data import DataError, numbered_rows, read_prompts, write_json, write_jsonl
from mt.hub import resolve_model

# the row fields a prompt may come from, in order of preference; a parquet file's other columns
# (completions, chosen, rejected: most of its bytes) are never read
ID_FIELDS = ("prompt_id", "id")
TEXT_FIELDS = ("prompt", "instruction")  # binarized / ours, openbmb
COLUMNS = ID_FIELDS + TEXT_FIELDS + ("messages",)
REASONS = ("empty", "duplicate", "id_conflict", "over_length")  # why a row is dropped


@dataclass
class PrepareOptions:
    """What to do with prompts the run would refuse."""
    # drop: leave them out (counted); keep: write them anyway (run_em.py's preflight then refuses
    # the run, naming the first one, unless --sampling.max_prompt_tokens is raised there too)
    over_length: str = opt("drop", choices=("drop", "keep"))


@dataclass
class PromptLimit:
    """The prompt length limit, the same flag and default as run_em.py's."""
    # prompt tokens under the policy's chat template (with the assistant header)
    max_prompt_tokens: int = opt(SamplingConfig().max_prompt_tokens, above=0)


@dataclass
class PrepareArgs:
    """python -m mt.prepare: UltraFeedback rows -> the prompt file of run_em.py --prompts."""
    inputs: str = ""  # (required) comma-separated .jsonl/.json/.parquet files, read in this order
    out: str = ""  # (required) the prompt file to write (.jsonl)
    # the policy whose chat template counts prompt tokens: a directory or a Hub id (org/name);
    # needed unless --prepare.over_length keep
    policy: str = ""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    sampling: PromptLimit = field(default_factory=PromptLimit)


# ---- one row -> (prompt text, id)

def normalise(text: str) -> str:
    """The text duplicates are compared on: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def text_id(text: str) -> str:
    """The id of a row without one: stable across runs, machines and whitespace variants."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def _bad(where: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: {problem}. Fix: {fix}")


def prompt_text(row: Any, where: str) -> tuple[str, bool]:
    """The row's prompt (None -> "") and whether a chat was cut to its first user turn.

    UltraFeedback prompts are single-turn instructions: openbmb's `instruction`, the binarized
    set's `prompt` (its `messages` is that instruction plus one response). The paper samples
    responses to those prompts x, so a chat yields its first user turn, as read_prompts does
    with a `messages` row; every chat cut that way is counted (multi_turn).
    """
    if not isinstance(row, dict):
        raise _bad(where, f"the row is a {type(row).__name__}, not an object",
                   "write each row as a JSON object with a 'prompt' or 'instruction' field")
    for key in (*TEXT_FIELDS, "messages"):
        if row.get(key) is not None:  # a null cell (parquet) falls through to the next field
            return _text_or_chat(row[key], where, key)
    if any(key in row for key in (*TEXT_FIELDS, "messages")):
        return "", False  # the fields are there but null: no prompt, dropped as empty
    raise _bad(where, f"no prompt field (has {', '.join(map(repr, sorted(row))) or 'no fields'})",
               "give each row a 'prompt' (ultrafeedback_binarized), 'instruction' "
               "(openbmb/UltraFeedback) or 'messages' field; is this an UltraFeedback file?")


def _text_or_chat(v: Any, where: str, key: str) -> tuple[str, bool]:
    if isinstance(v, str):
        return _utf8(v, where, key), False
    if isinstance(v, list) and all(isinstance(m, dict) for m in v):
        users = [m.get("content") for m in v if m.get("role") == "user"]
        if not users or not isinstance(users[0], str):
            raise _bad(where, f"field {key!r} has no user message with text content",
                       "give the chat a {\"role\": \"user\", \"content\": \"...\"} message")
        # cut: more than one user turn, or a system message the prompt leaves out
        return _utf8(users[0], where, key), len(users) > 1 or any(m.get("role") == "system" for m in v)
    raise _bad(where, f"field {key!r} is a {type(v).__name__}, not text or a chat",
               f"write {key!r} as a string (or a list of {{\"role\", \"content\"}} messages)")


def _utf8(text: str, where: str, key: str) -> str:
    try:  # JSON's "\ud800" escapes decode to lone surrogates no tokenizer (or UTF-8 file) takes
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(where, f"field {key!r} holds a lone UTF-16 surrogate at character {e.start}",
                   "write the character as one escape pair or as UTF-8 text") from None
    return text


def row_id(row: dict, where: str) -> str | None:
    for key in ID_FIELDS:
        v = row.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
            raise _bad(where, f"field {key!r} is {v!r}, not a non-empty string",
                       f"write {key!r} as a string, or remove it to use a hash of the text")
        return str(v)
    return None


# ---- the pass over every input

def prepare(inputs: list[Path], max_prompt_tokens: int, over_length: str, tok=None
            ) -> tuple[list[dict], list[dict], dict]:
    """(kept prompt rows, dropped records, summary); `tok` counts prompt tokens (None: not counted)."""
    kept, dropped = [], []
    first = {}  # normalised text -> (id, "file:row") of its first row
    ids = {}  # id -> normalised text
    files, total = {}, Counter()
    for path in inputs:
        c = Counter()
        for n, where, row in numbered_rows(path, COLUMNS):
            c["rows"] += 1
            text, multi = prompt_text(row, where)
            c["multi_turn"] += multi
            key, pid = normalise(text), row_id(row, where)
            rec = {"file": str(path), "row": n, "prompt_id": pid, "reason": None, "tokens": None}
            if not key:
                rec["reason"] = "empty"
            elif key in first:
                rec.update(reason="duplicate", duplicate_of=first[key][0], first_at=first[key][1])
                rec["prompt_id"] = pid or first[key][0]
            else:
                pid = pid or text_id(text)
                rec["prompt_id"] = pid
                first[key] = (pid, where)
                if pid in ids:  # the same id on another prompt: ids must be unique
                    rec["reason"] = "id_conflict"
                else:
                    ids[pid] = key
                    if tok is not None:  # as run_em.py's preflight counts them
                        rec["tokens"] = len(chat.encode_prompt(tok, _user(text)))
                    long = rec["tokens"] is not None and rec["tokens"] > max_prompt_tokens
                    c["over_length"] += long
                    if long and over_length == "drop":
                        rec["reason"] = "over_length"
            if rec["reason"]:
                c["dropped_" + rec["reason"]] += 1
                dropped.append(rec)
            else:
                c["kept"] += 1
                kept.append({"prompt_id": rec["prompt_id"], "prompt": _user(text)})
        files[str(path)] = {k: c[k] for k in _COUNTS}
        total.update(c)
    summary = {"kept": len(kept), "dropped": len(dropped),
               "totals": {k: total[k] for k in _COUNTS}, "files": files}
    return kept, dropped, summary


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


_COUNTS = ("rows", "kept", *(f"dropped_{r}" for r in REASONS), "over_length", "multi_turn")


def report(summary: dict, out: Path) -> str:
    """The printed summary: one line per input file, then the totals and where the files are."""
    def line(name, c):
        drops = ", ".join(f"{c['dropped_' + r]} {r}" for r in REASONS if c["dropped_" + r])
        notes = [f"{c['multi_turn']} chats cut to their first user turn"] if c["multi_turn"] else []
        if c["over_length"] and not c["dropped_over_length"]:
            notes.append(f"{c['over_length']} over the token limit KEPT")
        return (f"  {name}: {c['rows']} rows -> {c['kept']} prompts"
                + (f"; dropped {drops}" if drops else "")
                + (f" ({'; '.join(notes)})" if notes else ""))
    s = summary["settings"]
    tokens = (f"tokens counted with {s['policy']}'s chat template, limit "
              f"{s['max_prompt_tokens']}, over-length {s['over_length']}" if s["policy"]
              else "tokens not counted (no --policy)")
    lines = [f"{summary['kept']} prompts -> {out} ({tokens})"]
    lines += [line(name, c) for name, c in summary["files"].items()]
    if len(summary["files"]) > 1:
        lines.append(line("total", summary["totals"]))
    lines.append(f"counts: {summary['summary_file']}; dropped rows: {summary['dropped_file']}")
    return "\n".join(lines)


# ---- command line

def check(a: PrepareArgs) -> PrepareArgs:
    """Usage errors, before any file is read."""
    missing = [k for k in ("inputs", "out") if not getattr(a, k)]
    if missing:
        raise ConfigError(f"missing --{', --'.join(missing)} (--help lists every key)")
    if not a.policy and a.prepare.over_length == "drop":
        raise ConfigError("missing --policy: prompts are measured in the policy's tokens under its "
                          "chat template. Fix: pass --policy DIR (or a Hub id org/name), or "
                          "--prepare.over_length keep to skip the length check")
    if Path(a.out).suffix != ".jsonl":
        raise ConfigError(f"--out {a.out}: the prompt file is JSONL. Fix: name it *.jsonl")
    inputs = [Path(p) for p in a.inputs.split(",") if p]
    if any(p.resolve() == Path(a.out).resolve() for p in inputs):
        raise ConfigError(f"--out {a.out} is also an input. Fix: write to another file")
    return a


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = check(parse(argv, PrepareArgs(), "python -m mt.prepare", __doc__))
    inputs = [Path(p) for p in a.inputs.split(",") if p]
    out = Path(a.out)
    tok = None
    if a.policy:  # load the tokenizer before reading anything long
        tok = chat.load_tokenizer(resolve_model(a.policy, "--policy"))
    limit = a.sampling.max_prompt_tokens
    kept, dropped, summary = prepare(inputs, limit, a.prepare.over_length, tok)
    if not kept:
        raise DataError(f"{', '.join(map(str, inputs))}: no prompt left ({summary['totals']}). "
                        "Fix: check the inputs, or --sampling.max_prompt_tokens")
    summary_path = out.with_name(out.name + ".prepare.json")
    dropped_path = out.with_name(out.name + ".dropped.jsonl")
    summary.update(settings={"inputs": [str(p) for p in inputs], "policy": a.policy or None,
                             "max_prompt_tokens": limit, "over_length": a.prepare.over_length},
                   summary_file=str(summary_path), dropped_file=str(dropped_path))
    # the report files first, the prompt file last: a prompt file is never newer than its counts
    write_jsonl(dropped_path, dropped)
    write_json(summary_path, summary)
    write_jsonl(out, kept)
    read_prompts(out)  # what run_em.py will read: a bug here is ours, not the user's
    print(report(summary, out), flush=True)
    return summary


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` paragraph, exit status 2
