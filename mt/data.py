"""Validated readers and atomic writers for the files the stages exchange, plus the padding helper.

A row is a plain dict from reader to writer: what a reader returns is the row as the file holds it,
checked and normalised (ids are strings, a prompt is a list of messages). Schemas (all text, never
token ids; DESIGN.md section 2):
  prompts  {"prompt_id": str, "prompt": [messages]}   (read from "id" too, or UltraFeedback rows)
  samples  {"prompt_id", "prompt", "responses": [str], "finish_reasons": ["stop"|"length"],
            "num_tokens": [int]}
  scores   {"prompt_id", "scores": [float]}            (aligned with "responses")
  pairs    {"prompt_id", "prompt", "chosen": str, "rejected": str, "chosen_score"?,
            "rejected_score"?, ...any other fields, kept as they are}
A bad row raises DataError naming file, line, field and the fix; readers never write anything.
"""

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from mt.errors import UserError

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length")  # "length": hit the token cap without a stop token (truncated)
EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(UserError):
    """A malformed input file or row; the message says where (file:line),
    which field, and what to change."""


class _Bad(Exception):
    """Raised by the row parsers; the reader adds the file and line."""

    def __init__(self, field: str | None, problem: str, fix: str):
        super().__init__(problem)
        self.field, self.problem, self.fix = field, problem, fix


@dataclass
class ReadReport:
    """What a reader kept and, with on_error="skip", what it dropped ("file:line: reason")."""
    path: str = ""
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.path}: kept {self.kept} rows, skipped {len(self.skipped)}"
        return "\n".join([head] + ["  " + s for s in self.skipped])


# ---- field checks (raise _Bad; JSON type names in messages since users edit JSON)

def _jtype(v: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
             list: "array", dict: "object"}
    return names.get(type(v), type(v).__name__)


def _get(row: dict, key: str, what: str) -> Any:
    if key not in row:
        raise _Bad(key, "missing", f"add a '{key}' field ({what})")
    return row[key]


def _id(v: Any, key: str) -> str:
    # ints are accepted (common in datasets) and become strings,
    # so ids compare the same after a round-trip
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Bad(key, f"must be a string, got {_jtype(v)}",
                   f"write the id as a string, e.g. \"{key}\": \"42\"")
    if isinstance(v, str) and not v.strip():
        raise _Bad(key, "is empty", "give every row a non-empty id")
    return str(v)


def _text(v: Any, key: str, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise _Bad(key, f"must be a string, got {_jtype(v)}", "write the text as a JSON string")
    if not allow_empty and not v.strip():
        raise _Bad(key, "is empty or whitespace only", f"put the text in '{key}' or drop the row")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON's "\ud800" escapes decode to lone surrogates no tokenizer takes
        raise _Bad(key, f"holds a lone UTF-16 surrogate ({v[e.start]!r} at character {e.start})",
                   "write the character as one escape pair or as UTF-8 text") from None
    return v


def _score(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(key, f"must be a number, got {_jtype(v)}", "write the score as a JSON number")
    if not math.isfinite(v):
        raise _Bad(key, f"is {v} (not finite)",
                   "re-score this response; scores must be finite numbers")
    return float(v)


def _list(v: Any, key: str, what: str) -> list:
    if not isinstance(v, list):
        raise _Bad(key, f"must be an array, got {_jtype(v)}",
                   f"write '{key}' as a JSON array of {what}")
    if not v:
        raise _Bad(key, "is an empty array",
                   f"give at least one {what[:-1]} in '{key}' or drop the row")
    return v


def _messages(v: Any, key: str) -> list[dict]:
    """A chat as [{"role", "content"}]; a plain string becomes one user message."""
    if isinstance(v, str):
        return [{"role": "user", "content": _text(v, key)}]
    if not isinstance(v, list):
        raise _Bad(key, f"must be a string or an array of messages, got {_jtype(v)}",
                   'write it as "text" or [{"role": "user", "content": "text"}]')
    if not v:
        raise _Bad(key, "is an empty array",
                   "give at least one {\"role\": \"user\", \"content\": ...} message")
    out = []
    for i, m in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(where, f"must be an object, got {_jtype(m)}",
                       'write each message as {"role": ..., "content": ...}')
        for k in ("role", "content"):
            if k not in m:
                raise _Bad(f"{where}.{k}", "missing",
                           'write each message as {"role": ..., "content": ...}')
        if m["role"] not in ROLES:
            raise _Bad(f"{where}.role", f"unknown role {m['role']!r}",
                       "use one of " + ", ".join(ROLES))
        out.append({"role": m["role"], "content": _text(m["content"], f"{where}.content")})
    return out


def prompt_hash(messages: list[dict]) -> str:
    """Stable id for a row without one: first 16 hex of sha1 of the prompt text
    (of canonical JSON for chats)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        # so "text" and [{"role": "user", "content": "text"}] get the same id
        text = messages[0]["content"]
    else:
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _row_id(row: dict, messages: list[dict]) -> str:
    for key in ("prompt_id", "id"):
        if key in row:
            return _id(row[key], key)
    return prompt_hash(messages)


# ---- row parsers: JSON object -> the checked, normalised row

def _parse_prompt(row: dict) -> dict:
    if "prompt" in row:
        msgs = _messages(row["prompt"], "prompt")
    elif "messages" in row:
        # UltraFeedback-binarized: the prompt is the chat up to the first user turn
        msgs = _messages(row["messages"], "messages")
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise _Bad("messages", "has no user message",
                       "add the user's prompt as a 'user' message")
        msgs = msgs[: users[0] + 1]
    else:
        raise _Bad("prompt", "missing", "add a 'prompt' field (a string or an array of messages)")
    if msgs[-1]["role"] != "user":
        raise _Bad("prompt", f"last message has role {msgs[-1]['role']!r}",
                   "end the prompt with a 'user' message")
    return {"prompt_id": _row_id(row, msgs), "prompt": msgs}


_PAIR_KEYS = {"prompt_id", "id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
              "score_chosen", "score_rejected", "messages"}


def _response(v: Any, key: str) -> tuple[str, list[dict] | None]:
    """A response as text, or (UltraFeedback) as a chat whose last assistant message is the
    response."""
    if isinstance(v, list):
        msgs = _messages(v, key)
        idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not idx:
            raise _Bad(key, "has no assistant message",
                       "end the conversation with the assistant's response")
        return msgs[idx[-1]]["content"], msgs[: idx[-1]]
    return _text(v, key), None


def _parse_pair(row: dict) -> dict:
    chosen, chat = _response(_get(row, "chosen", "the preferred response text"), "chosen")
    rejected, _ = _response(_get(row, "rejected", "the dispreferred response text"), "rejected")
    if "prompt" in row:
        prompt = _messages(row["prompt"], "prompt")
    elif chat:  # the turns before the chosen response
        prompt = chat
    else:
        raise _Bad("prompt", "missing", "add a 'prompt' field (a string or an array of messages)")
    if prompt[-1]["role"] != "user":
        raise _Bad("prompt", f"last message has role {prompt[-1]['role']!r}",
                   "end the prompt with the 'user' turn the responses answer")
    if chosen == rejected:
        raise _Bad("rejected", "is identical to 'chosen'",
                   "a pair needs two different responses; drop this row")
    scores = []
    for ours, uf in (("chosen_score", "score_chosen"), ("rejected_score", "score_rejected")):
        key = ours if ours in row else uf
        scores.append(None if row.get(key) is None else _score(row[key], key))
    out = {"prompt_id": _row_id(row, prompt), "prompt": prompt, "chosen": chosen,
           "rejected": rejected}
    for key, score in zip(("chosen_score", "rejected_score"), scores):
        if score is not None:
            out[key] = score
    for k, v in row.items():  # any other field (e.g. delta, eps), kept as is; the named fields win
        if k not in _PAIR_KEYS:
            out.setdefault(k, v)
    return out


def _parse_sample(row: dict) -> dict:
    pid = _id(_get(row, "prompt_id", "the prompt's id"), "prompt_id")
    prompt = _messages(_get(row, "prompt", "the prompt's messages"), "prompt")
    responses = _list(_get(row, "responses", "the sampled texts"), "responses", "strings")
    responses = [_text(r, f"responses[{i}]", allow_empty=True) for i, r in enumerate(responses)]
    reasons = _list(_get(row, "finish_reasons", "one per response"), "finish_reasons", "strings")
    ntok = _list(_get(row, "num_tokens", "one per response"), "num_tokens", "integers")
    for key, v in (("finish_reasons", reasons), ("num_tokens", ntok)):
        if len(v) != len(responses):
            raise _Bad(key, f"has length {len(v)} but 'responses' has length {len(responses)}",
                       "give one entry per response")
    for i, r in enumerate(reasons):
        if r not in FINISH_REASONS:
            raise _Bad(f"finish_reasons[{i}]", f"is {r!r}",
                       "use 'stop' (ended on a stop token) or 'length' (truncated)")
    for i, n in enumerate(ntok):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise _Bad(f"num_tokens[{i}]", f"is {n!r}",
                       "write the response's token count as an integer >= 0")
    return {"prompt_id": pid, "prompt": prompt, "responses": responses,
            "finish_reasons": list(reasons), "num_tokens": list(ntok)}


def _parse_scores(row: dict) -> dict:
    pid = _id(_get(row, "prompt_id", "the prompt's id"), "prompt_id")
    scores = _list(_get(row, "scores", "one number per response"), "scores", "numbers")
    return {"prompt_id": pid, "scores": [_score(s, f"scores[{i}]") for i, s in enumerate(scores)]}


# ---- file reading: locate every row, parse it, check ids are unique

def _raw_rows(path: Path, columns: tuple[str, ...] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line or row number, JSON value or _Bad);
    file-level problems raise DataError. `columns`: read only these parquet columns (if present)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:  # decode per line, so invalid UTF-8 is reported at its line
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield n, _Bad(None, f"invalid UTF-8 at byte {e.start}",
                                  "re-save the file as UTF-8")
                    continue
                if line.strip():  # blank lines (e.g. a trailing newline) are not rows
                    try:
                        yield n, json.loads(line.rstrip())  # rstrip: columns point into the text
                    except json.JSONDecodeError as e:
                        yield n, _Bad(None, f"invalid JSON ({e.msg} at column {e.colno})",
                                      "write exactly one complete JSON object per line")
                    except RecursionError:
                        yield n, _Bad(None, "JSON nested too deeply to read",
                                      "write a flat row object")
        return
    if path.suffix == ".json":
        data = path.read_bytes()
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}. Fix: re-save the "
                            "file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}). "
                            "Fix: the file must be one JSON array of objects") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read. Fix: write an array of flat "
                            "row objects") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: top level is a JSON {_jtype(rows)}. Fix: make it an array "
                            "of row objects (or write one object per line in a .jsonl file)")
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow. Fix: pip install pyarrow, "
                            "or convert the file to JSONL") from None
        try:
            if columns is None:
                rows = pq.read_table(path).to_pylist()
            else:  # a parquet file's other columns are never decoded
                names = set(pq.read_schema(path).names)
                rows = pq.read_table(path, columns=[c for c in columns if c in names]).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}). Fix: "
                            "download the file again (it may be truncated), or convert it to "
                            "JSONL") from None
    yield from enumerate(rows, 1)


def _finite(v: Any, key: str):
    """NaN / Infinity anywhere in a row: Python's json reads them, but they are not JSON and no
    writer here takes them back (allow_nan=False), so a stage would fail only when it writes."""
    if isinstance(v, float) and not math.isfinite(v):
        raise _Bad(key, f"is {v} (not finite; NaN and Infinity are not JSON)",
                   "write a finite number, or drop the field")
    if isinstance(v, dict):
        for k, x in v.items():
            _finite(x, f"{key}.{k}" if key else k)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _finite(x, f"{key}[{i}]")


def _check_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file. Fix: give the file inside it "
                        f"(a {', '.join(EXTENSIONS)} file)")
    if not path.is_file():
        raise DataError(f"{path}: no such file. Fix: check the path (cwd is {os.getcwd()})")
    if path.suffix not in EXTENSIONS:
        raise DataError(f"{path}: unknown extension {path.suffix!r}. Fix: use one of "
                        + ", ".join(EXTENSIONS))
    return path


def iter_rows(path) -> Iterator[tuple[str, Any]]:
    """(location, JSON row) of a .jsonl / .json / .parquet file,
    for readers with their own schema (eval/).

    The location is 'file:line' (JSONL) or 'file[row n]'; unreadable rows raise DataError there.
    """
    for _, where, row in numbered_rows(path):
        yield where, row


def numbered_rows(path, columns: tuple[str, ...] | None = None
                  ) -> Iterator[tuple[int, str, Any]]:
    """(1-based line or row number, location, JSON row) of a .jsonl / .json / .parquet file;
    `columns` limits what is read of a parquet file. Unreadable rows raise DataError there."""
    path = _check_path(path)
    for n, row in _raw_rows(path, columns):
        where = f"{path}:{n}" if path.suffix == ".jsonl" else f"{path}[row {n}]"
        if isinstance(row, _Bad):
            raise DataError(f"{where}: {row.problem}. Fix: {row.fix}")
        yield n, where, row


def _read(path, parse: Callable[[dict], Any], key: Callable[[Any], Any], dup: str,
          on_error: str, report: ReadReport | None) -> list:
    """Parse every row of `path`: a bad row raises DataError,
    or with on_error="skip" is listed in `report`."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = _check_path(path)
    # JSON arrays and parquet are located by row index
    unit = "line" if path.suffix == ".jsonl" else "row"
    silent = report is None  # nobody will look at the report, so a skip must at least warn
    report = ReadReport() if silent else report
    report.path, report.kept, report.skipped = str(path), 0, []
    out, seen, nrows = [], {}, 0
    for n, row in _raw_rows(path):
        nrows += 1
        try:
            if isinstance(row, _Bad):
                raise row
            if not isinstance(row, dict):
                raise _Bad(None, f"row is a JSON {_jtype(row)}, not an object",
                           "write each row as a {...} object")
            obj = parse(row)
            _finite(obj, "")  # the fields the parser keeps as they are (named ones are checked)
            k = key(obj)
            if k in seen:
                hashed = (" (rows without an id get prompt_hash of their text)" if dup != "row"
                          else "")
                raise _Bad("prompt_id",
                           f"duplicate {dup} for {k if isinstance(k, str) else k[0]!r} "
                           f"(first at {unit} {seen[k]})",
                           "drop the repeated row or give it another id" + hashed)
            seen[k] = n
        except _Bad as e:
            loc = f"{path}:{n}" if unit == "line" else f"{path}[row {n}]"
            msg = f"{loc}:{f' field {e.field!r}:' if e.field else ''} {e.problem}. Fix: {e.fix}"
            if on_error == "raise":
                raise DataError(msg) from None
            report.skipped.append(msg)
            continue
        out.append(obj)
    report.kept = len(out)
    if nrows == 0:
        raise DataError(f"{path}: file is empty (no rows). Fix: check the path or the stage that "
                        "wrote it")
    if not out:
        raise DataError(f"{path}: no valid rows (all {nrows} skipped):\n{report}")
    if report.skipped and silent:
        warnings.warn(str(report), stacklevel=3)
    return out


def read_prompts(path, on_error: str = "raise", report: ReadReport | None = None) -> list[dict]:
    """Prompts from {"prompt_id"|"id", "prompt"}, {"prompt"} (id = prompt_hash)
    or UltraFeedback rows."""
    return _read(path, _parse_prompt, lambda p: p["prompt_id"], "prompt", on_error, report)


def read_pairs(path, on_error: str = "raise", report: ReadReport | None = None) -> list[dict]:
    """Preference pairs; the same (prompt_id, chosen, rejected) twice is an error
    (it would double-weight it)."""
    return _read(path, _parse_pair, lambda p: (p["prompt_id"], p["chosen"], p["rejected"]), "pair",
                 on_error, report)


def read_samples(path, on_error: str = "raise", report: ReadReport | None = None) -> list[dict]:
    """Sampled responses, one row per prompt."""
    return _read(path, _parse_sample, lambda s: s["prompt_id"], "row", on_error, report)


def read_scores(path, on_error: str = "raise", report: ReadReport | None = None) -> list[dict]:
    """Reward scores, one row per prompt, aligned with that prompt's responses."""
    return _read(path, _parse_scores, lambda s: s["prompt_id"], "row", on_error, report)


def _parse_pseudo_pair(row: dict) -> dict:
    out = dict(row)
    out["prompt_id"] = _id(_get(row, "prompt_id", "the prompt's id"), "prompt_id")
    out["prompt"] = _messages(_get(row, "prompt", "the prompt's messages"), "prompt")
    for key in ("y_t", "y_prev"):
        _text(_get(row, key, "a response of π_t / π_{t-1}"), key, allow_empty=True)
    for key in ("score_t", "score_prev", "delta"):
        out[key] = _score(_get(row, key, "r_{t-1}'s score or margin"), key)
    if not isinstance(_get(row, "valid", "whether both responses are usable"), bool):
        raise _Bad("valid", f"must be true or false, got {_jtype(row['valid'])}",
                   "write a JSON boolean")
    return out


def read_pseudo_pairs(path) -> list[dict]:
    """Pseudo-pairs {"prompt_id", "prompt", "y_t", "y_prev", "score_t", "score_prev", "delta",
    "valid", and once filtered "chosen", "rejected", "eps", "kept", "swapped", "reason"},
    one row per prompt of D_R."""
    return _read(path, _parse_pseudo_pair, lambda r: r["prompt_id"], "row", "raise", None)


# ---- writing: all-or-nothing

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask can only be read by setting it
FILE_MODE = 0o666 & ~_UMASK  # the mode open() gives a new file; what every file we write gets


def atomic_write_text(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file atomically: `write(f)` fills a temp file in the same directory, fsync, rename.

    A reader never sees a half-written file, and a failure leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp file lives in the same directory so os.replace is a rename on one filesystem
    # (atomic)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; a written file gets the mode open() would give
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # the previous file, if any, is untouched
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically."""
    def write(f):
        for row in rows:
            # allow_nan=False: NaN/Infinity are not JSON and our readers reject them anyway
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically (configs, manifests, metrics)."""
    atomic_write_text(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False,
                                                         allow_nan=False) + "\n"))


class Record(dict):
    """A JSON object read by read_json: a missing key is a DataError naming the file and the key,
    not a KeyError traceback (a file edited by hand, or written by another version)."""
    path = ""

    def __missing__(self, key):
        raise DataError(f"{self.path}: no {key!r} in {{{', '.join(map(repr, list(self)[:8]))}"
                        f"{', ...' if len(self) > 8 else ''}}} (edited, or written by another "
                        "version). Fix: restore it from a copy of the run, or delete it and rerun "
                        "the command that wrote the run: a stage whose outputs are missing or "
                        "changed runs again")

    def __reduce__(self):  # pickled (broadcast_object) as a plain dict
        return dict, (dict(self),)


def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """One JSON document this project wrote (stats, selection, metrics);
    a corrupt one names the file, and so does a missing key of any of its objects (Record).
    `fix`: what to change when the file is not ours (a model's), in place of rerunning a stage."""
    path = Path(path)

    def record(obj: dict) -> Record:
        r = Record(obj)
        r.path = str(path)
        return r
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSON file. Fix: give the file (or move "
                        "the directory away)")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_hook=record)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. Fix: " + (fix or "rerun the command that wrote the "
                        "run (a finished stage whose outputs are missing runs again)")) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"{path}: not valid JSON ({why}). Fix: "
                        + (fix or "delete it and rerun the stage that writes it")) from None


def read_jsonl_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file this project wrote (no schema: manifests, metrics, ref log-probs);
    a row that is not a JSON object names its file and line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise json.JSONDecodeError("not a JSON object", line, 0)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}:{n}: not a JSON object row ({type(e).__name__}: {e}). Fix: delete "
                        "the file and rerun the stage that writes it") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror}). Fix: rerun the stage that writes it"
                        ) from None
    return rows


# ---- padding / collation

def pad_sequences(seqs: list[list[int]], pad_id: int,
                  side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ids (B, T) padded with pad_id on `side`, plus their lengths (B,)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # (B,)
    T = int(lengths.max())
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            row = torch.as_tensor(s, dtype=torch.long)
            if side == "right":
                ids[i, : len(s)] = row
            else:
                ids[i, T - len(s):] = row
    return ids, lengths
