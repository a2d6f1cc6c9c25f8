r"""Answers for external judges: AlpacaEval 2 model_outputs.json and Arena-Hard answer files.

    python eval/generate.py --policy runs/mt --format alpacaeval \
        --prompts alpaca_eval.json --out runs/mt/eval/alpacaeval/model_outputs.json
    python eval/generate.py --policy runs/mt --format arenahard \
        --prompts data/arena-hard-v2.0/question.jsonl --out data/arena-hard-v2.0/model_answer/mt.jsonl
    torchrun --nproc_per_node 8 eval/generate.py ...        # data-parallel sampling, same files

--policy is a model directory or a finished run directory (its selected policy, summary.json; the
answers are named after the run). --prompts is the benchmark's own file: AlpacaEval's eval set (a JSON array or JSONL of rows with
"instruction", optional "dataset") or Arena-Hard's question.jsonl in either official layout
(today's, arena-hard-auto since 2025-04-18: "uid", "category", "prompt"; v0.1's before:
"question_id", "turns": [{"content"}]). Arena-Hard answers are written in today's layout ("uid",
"ans_id", "model", "messages", "tstamp", "metadata") unless --answer_format v0.1 ("question_id",
"answer_id", "model_id", "choices", "tstamp", "conv_metadata"); both carry token_len and the
markdown counts that the style-control option reads (header_count, list_count, bold_count).
Each prompt becomes one user message under the policy's chat template. Decoding defaults to the
paper's sampling settings (appendix B); every one is a flag, --sampling.*. The raw samples (finish
reasons, token counts) are kept next to --out as *.samples.jsonl.
"""
from __future__ import annotations

import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/generate.py`: make `mt` and `eval` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import chat, checkpoint, dist, hub  # noqa: E402
from mt.config import SamplingConfig  # noqa: E402
from mt.flags import ConfigError, opt, parse  # noqa: E402
from mt.data import iter_rows, read_samples, write_json, write_jsonl  # noqa: E402
from mt.errors import UserError  # noqa: E402
from mt.runs import resolve_model  # noqa: E402
from mt.sampler import check_sampling, require, sample_to_file, summary_line  # noqa: E402

FORMATS = ("alpacaeval", "arenahard")
ANSWER_FORMATS = ("current", "v0.1")  # Arena-Hard: arena-hard-auto since 2025-04-18 | before


@dataclass
class GenerateArgs:
    """python eval/generate.py: one answer per benchmark prompt, in the judge's file format."""
    # (required) the policy: a causal-LM directory, a Hub id (org/name), or a finished run directory
    # (its selected policy, from summary.json)
    policy: str = ""
    format: str = ""  # (required) alpacaeval | arenahard
    prompts: str = ""  # (required) AlpacaEval eval set (.json/.jsonl) or Arena-Hard question.jsonl
    out: str = ""  # (required) model_outputs.json (alpacaeval) or model_answer/NAME.jsonl (arenahard)
    name: str = ""  # generator / model_id; "" = the policy directory's name
    samples_out: str = ""  # raw samples file; "" = beside --out (see default_samples_path)
    no_strip: bool = False  # keep leading/trailing whitespace of answers
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # names the random streams with the stream "eval/answers"
    # arenahard: the answer file's layout: arena-hard-auto's current one (2025-04-18 on) or v0.1's
    answer_format: str = opt("current", choices=ANSWER_FORMATS)
    # arenahard token_len: the policy's own tokens, or tiktoken's as arena-hard-auto counts them
    # (gpt-4o's encoding; v0.1: gpt-3.5-turbo's); tiktoken needs `pip install tiktoken`
    token_len: str = opt("policy", choices=("policy", "tiktoken"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class PromptFileError(UserError):
    """A benchmark prompt file we cannot use; the message names file, row, field and the fix."""


# ---- reading the benchmarks' prompt files


def _text(row: dict, key: str, where: str, fix: str) -> str:
    if key not in row:
        raise PromptFileError(f"{where}: field {key!r} missing. Fix: {fix}")
    v = row[key]
    if not isinstance(v, str):
        raise PromptFileError(f"{where}: field {key!r} must be a string, got {type(v).__name__}. Fix: {fix}")
    if not v.strip():
        raise PromptFileError(f"{where}: field {key!r} is empty. Fix: {fix}")
    return v


def read_alpacaeval(path) -> list[dict]:
    """AlpacaEval rows: {"instruction", optional "dataset"}; a missing or empty instruction is an error."""
    out = []
    for where, row in iter_rows(Path(path)):
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: row is not an object. Fix: AlpacaEval rows are "
                                  '{"instruction", "dataset"} objects')
        r = {"instruction": _text(row, "instruction", where, "give every row a non-empty 'instruction'")}
        if "dataset" in row:
            r["dataset"] = row["dataset"]
        out.append(r)
    if not out:
        raise PromptFileError(f"{path}: no rows. Fix: give the benchmark's prompt file")
    return out


def read_arenahard(path) -> list[dict]:
    """Arena-Hard questions, single-turn, in either official layout (one layout per file):

    current (arena-hard-auto since 2025-04-18, v0.1 and v2.0 data): {"uid", "category", "prompt"};
    v0.1 (before): {"question_id", "category", "turns": [{"content"}]}.
    Returns rows {"uid", "content", "layout"} in file order; "uid" keeps its type (string or int).
    """
    out, seen, first = [], {}, None
    for where, row in iter_rows(Path(path)):
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: row is not an object. Fix: Arena-Hard rows are "
                                  '{"uid", "category", "prompt"} objects')
        layout = ("current" if "uid" in row or "prompt" in row else
                  "v0.1" if "question_id" in row or "turns" in row else None)
        if layout is None:
            raise PromptFileError(f"{where}: field 'uid' missing. Fix: Arena-Hard rows are "
                                  '{"uid", "category", "prompt"} (or v0.1\'s {"question_id", '
                                  '"turns"})')
        if first is None:
            first = (layout, where)
        elif layout != first[0]:
            raise PromptFileError(f"{where}: row is in the {layout} layout, {first[1]} in the "
                                  f"{first[0]} one. Fix: one layout per file (a question.jsonl as "
                                  "published)")
        key = "uid" if layout == "current" else "question_id"
        if key not in row:
            raise PromptFileError(f"{where}: field {key!r} missing. Fix: Arena-Hard rows need "
                                  f"{key}")
        qid = row[key]
        blank = isinstance(qid, str) and not qid.strip()
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or blank:
            raise PromptFileError(f"{where}: field {key!r} must be a non-empty string or an "
                                  "integer. Fix: give every row its own id")
        if qid in seen:
            raise PromptFileError(f"{where}: field {key!r} {qid!r} repeats {seen[qid]}. Fix: drop "
                                  "the duplicate")
        seen[qid] = where
        if layout == "current":
            content = _text(row, "prompt", where, "put the question text in 'prompt'")
        else:
            content = _v01_content(row, where)
        out.append({"uid": qid, "content": content, "layout": layout})
    if not out:
        raise PromptFileError(f"{path}: no rows. Fix: give the benchmark's prompt file")
    return out


def _v01_content(row: dict, where: str) -> str:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise PromptFileError(f"{where}: field 'turns' missing or empty. Fix: "
                              '"turns": [{"content": ...}]')
    if len(turns) > 1:
        raise PromptFileError(f"{where}: field 'turns' has {len(turns)} turns; only single-turn "
                              "questions are supported (Arena-Hard v0.1 is single-turn)")
    if not isinstance(turns[0], dict):
        raise PromptFileError(f"{where}: field 'turns[0]' must be an object " '{"content": ...}')
    return _text(turns[0], "content", f"{where}: turns[0]",
                 "put the question text in turns[0].content")


# ---- writing the judges' input files (field names as their loaders read them)


def alpacaeval_outputs(rows: list[dict], responses: list[str], generator: str) -> list[dict]:
    """model_outputs.json rows: instruction (verbatim: AlpacaEval matches references by it), output,
    generator, and dataset when the input had it."""
    assert len(rows) == len(responses)
    out = []
    for r, y in zip(rows, responses):
        o = {"instruction": r["instruction"], "output": y, "generator": generator}
        if "dataset" in r:
            o["dataset"] = r["dataset"]
        out.append(o)
    return out


# What arena-hard-auto's style control counts (utils/add_markdown_info.py, v0.1 and today alike):
# the text inside each ``` fence pair is deleted, wherever else it occurs too; then, at a line
# start, headers of exactly n '#' and a whitespace, ordered items (digits, '.', a whitespace) and
# unordered ones ('-', '*' or '+', a whitespace), both after optional whitespace; bold spans
# (**...** / __...__) within a line.
_FENCED = re.compile(r"```([^`]*)```")
_MARKDOWN = {
    "header_count": {f"h{n}": re.compile("^" + "#" * n + r"\s", re.M) for n in range(1, 7)},
    "list_count": {"ordered": re.compile(r"^\s*\d+\.\s", re.M),
                   "unordered": re.compile(r"^\s*[-*+]\s", re.M)},
    "bold_count": {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")},
}


def markdown_counts(answer: str) -> dict:
    """{"header_count": {h1..h6}, "list_count": {ordered, unordered}, "bold_count": {"**", "__"}}
    of an answer, as arena-hard-auto's style control counts them (see _MARKDOWN)."""
    text = answer
    for inside in _FENCED.findall(answer):
        text = text.replace(inside, "")
    return {name: {k: len(p.findall(text)) for k, p in kinds.items()}
            for name, kinds in _MARKDOWN.items()}


def answer_metadata(answer: str, token_len: int) -> dict:
    """token_len first: show_result.py's style control reads the values in this order (length,
    then the header, list and bold counts, each dict summed)."""
    return {"token_len": token_len, **markdown_counts(answer)}


def arenahard_answers(questions: list[dict], responses: list[str], token_lens: list[int],
                      model_id: str, tstamp: float | None = None,
                      answer_format: str = "current") -> list[dict]:
    """model_answer/{model_id}.jsonl rows (the model name is the file's name), one per question.

    current: {"uid", "ans_id", "model", "messages": [user, {"role": "assistant", "content":
    {"answer"}}], "tstamp", "metadata"}. v0.1: {"question_id", "answer_id", "model_id", "choices":
    [{"index": 0, "turns": [{"content", "token_len"}]}], "tstamp", "conv_metadata"} (show_result
    read the length from turns[0].token_len in older versions, conv_metadata.token_len in newer).
    metadata / conv_metadata: token_len and the markdown counts of style control.
    """
    assert len(questions) == len(responses) == len(token_lens)
    assert answer_format in ANSWER_FORMATS, answer_format
    tstamp = time.time() if tstamp is None else tstamp
    out = []
    for q, y, n in zip(questions, responses, token_lens):
        meta = answer_metadata(y, n)
        if answer_format == "current":
            messages = [{"role": "user", "content": q["content"]},
                        {"role": "assistant", "content": {"answer": y}}]
            out.append({"uid": q["uid"], "ans_id": uuid.uuid4().hex, "model": model_id,
                        "messages": messages, "tstamp": tstamp, "metadata": meta})
        else:
            choices = [{"index": 0, "turns": [{"content": y, "token_len": n}]}]
            out.append({"question_id": q["uid"], "answer_id": uuid.uuid4().hex,
                        "model_id": model_id, "choices": choices, "tstamp": tstamp,
                        "conv_metadata": meta})
    return out


def tiktoken_counter(answer_format: str):
    """len(tokens) as arena-hard-auto counts them: tiktoken for gpt-4o (o200k_base) today, for
    gpt-3.5-turbo (cl100k_base) in v0.1; special-token text counts as plain text."""
    try:
        import tiktoken  # optional: imported only when --token_len tiktoken asks for it
    except ImportError:
        raise ConfigError("--token_len tiktoken needs the tiktoken package: pip install tiktoken "
                          "(it fetches its encoding once, then reads it from its cache)") from None
    enc = tiktoken.encoding_for_model("gpt-4o" if answer_format == "current" else "gpt-3.5-turbo")
    return lambda text: len(enc.encode(text, disallowed_special=()))


def response_tokens(finish_reason: str, num_tokens: int) -> int:
    """Tokens of the answer text: the sampler counts the stop token, which is not part of the text."""
    return num_tokens - (finish_reason == "stop")


def default_samples_path(out: Path, fmt: str) -> Path:
    """Where the raw samples go: beside model_outputs.json, or in a samples/ subdirectory of
    model_answer/ (Arena-Hard reads every model_answer/*.jsonl as a model's answers)."""
    if fmt == "arenahard":
        return out.parent / "samples" / f"{out.stem}.samples.jsonl"
    return out.with_name(out.stem + ".samples.jsonl")


# ---- the model part


def sample_answers(policy, prompts: list[dict], sampling, samples_out, seed: int = 0, device=None,
                   dtype: str = "auto", source="the prompt rows") -> list[dict]:
    """One response per prompt row {"prompt_id", "prompt"}, data-parallel; returns the samples rows in
    prompt order. `source`: the prompt file, named by an over-long prompt's error."""
    d = dist.init_distributed(device)
    tok = chat.load_tokenizer(policy)
    model = checkpoint.load_model(policy, dtype=dtype, device=d.device, head="lm").eval()
    s = sample_to_file(model, tok, prompts, sampling, samples_out, seed=seed, stream="eval/answers", n=1,
                       stop_ids=chat.stop_ids(tok, policy), source=source)
    dist.print0(summary_line(s) + f" -> {samples_out}")
    by_id = {r["prompt_id"]: r for r in read_samples(samples_out)}
    return [by_id[p["prompt_id"]] for p in prompts]


# ---- command line


def model_name(a: GenerateArgs) -> str:
    return a.name or Path(a.policy).resolve().name


def check(a: GenerateArgs) -> GenerateArgs:
    """Usage errors, before any file is read: each names its flag."""
    require(a, "policy", "format", "prompts", "out")
    if a.format not in FORMATS:
        raise ConfigError(f"--format={a.format!r}: must be one of {', '.join(FORMATS)}")
    name, out = model_name(a), Path(a.out)
    if out.is_dir():
        fix = out / ("model_outputs.json" if a.format == "alpacaeval" else f"{name}.jsonl")
        raise ConfigError(f"--out {out}: is a directory; it names the answer file. Fix: --out {fix}")
    if a.format == "arenahard" and out.name != f"{name}.jsonl":
        # gen_judgment takes the model name from the answer file's name, show_result from "model"
        raise ConfigError(f"--out {out}: Arena-Hard reads the model name from the file name, so it must "
                          f"be '{name}.jsonl'. Fix: --out {out.with_name(name + '.jsonl')} "
                          f"or --name {out.stem}")
    if a.format == "arenahard" and a.token_len == "tiktoken":
        tiktoken_counter(a.answer_format)  # a missing package: a usage error, before any sampling
    check_sampling(a.sampling)
    return a


def parse_args(argv=None) -> GenerateArgs:
    argv = sys.argv[1:] if argv is None else list(argv)
    return check(parse(argv, GenerateArgs(), "python eval/generate.py", __doc__))


def main(argv=None) -> dict:
    a = parse_args(argv)
    name, out = model_name(a), Path(a.out)
    hub.resolve_flags(a, "policy")  # a Hub id -> its cached snapshot (the name is the id's)
    # read (and validate) the prompt file before loading any model
    rows = read_alpacaeval(a.prompts) if a.format == "alpacaeval" else read_arenahard(a.prompts)
    texts = [r["instruction"] if a.format == "alpacaeval" else r["content"] for r in rows]
    prompts = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": t}]}  # ids: row order
               for i, t in enumerate(texts)]
    samples_out = Path(a.samples_out) if a.samples_out else default_samples_path(out, a.format)
    device = None if a.device == "auto" else a.device
    dist.init_distributed(device)
    policy = resolve_model(a.policy, "policy")  # a run directory: its selected checkpoint
    samples = sample_answers(policy, prompts, a.sampling, samples_out, a.seed, device, a.dtype,
                             f"{a.prompts} (ids: row numbers from 0)")
    first = [s["responses"][0] for s in samples]
    answers = first if a.no_strip else [y.strip() for y in first]
    truncated = sum(s["finish_reasons"][0] == "length" for s in samples)
    if a.format == "alpacaeval":
        result = alpacaeval_outputs(rows, answers, name)
    else:
        if a.token_len == "tiktoken":
            count = tiktoken_counter(a.answer_format)
            lens = [count(y) for y in answers]
        else:
            lens = [response_tokens(s["finish_reasons"][0], s["num_tokens"][0]) for s in samples]
        result = arenahard_answers(rows, answers, lens, name, answer_format=a.answer_format)
        if rows[0]["layout"] != a.answer_format:
            layout = rows[0]["layout"]
            dist.print0(f"{a.prompts}: questions in the {layout} layout; answers in the "
                        f"{a.answer_format} one (--answer_format {layout} for that layout's code)")
    if dist.get().is_main:
        (write_json if a.format == "alpacaeval" else write_jsonl)(out, result)
        print(f"{len(result)} answers by {name} -> {out} ({truncated} hit "
              f"--sampling.max_new_tokens={a.sampling.max_new_tokens})", flush=True)
    return {"out": str(out), "n": len(result), "truncated": truncated, "samples": str(samples_out)}


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
