r"""Answers for external judges: AlpacaEval 2 model_outputs.json and Arena-Hard (v0.1) answer files.

    python eval/generate.py --policy runs/mt/iter2/policy --format alpacaeval \
        --prompts alpaca_eval.json --out results/mt-iter2/model_outputs.json --name mt-iter2
    python eval/generate.py --policy runs/mt/iter2/policy --format arenahard \
        --prompts data/arena-hard-v0.1/question.jsonl --out data/arena-hard-v0.1/model_answer/mt-iter2.jsonl \
        --name mt-iter2
    torchrun --nproc_per_node 8 eval/generate.py ...        # data-parallel sampling, same files

--prompts is the benchmark's own file: AlpacaEval's eval set (a JSON array or JSONL of rows with
"instruction", optional "dataset") or Arena-Hard's question.jsonl ("question_id", "turns":
[{"content"}]). Each prompt becomes one user message under the policy's chat template. Decoding
defaults to the paper's sampling settings (appendix B); every one is a flag, --sampling.*. The raw
samples (finish reasons, token counts) are kept next to --out as *.samples.jsonl.
"""
from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/generate.py`: make `mt` and `eval` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import chat, checkpoint, dist  # noqa: E402
from mt.config import ConfigError, SamplingConfig, opt, parse  # noqa: E402
from mt.data import iter_rows, read_samples, write_json, write_jsonl  # noqa: E402
from mt.sampler import check_sampling, require, sample_to_file, summary_line  # noqa: E402

FORMATS = ("alpacaeval", "arenahard")


@dataclass
class GenerateArgs:
    """python eval/generate.py: one answer per benchmark prompt, in the judge's file format."""
    policy: str = ""  # (required) the policy: a Hugging Face causal-LM directory
    format: str = ""  # (required) alpacaeval | arenahard
    prompts: str = ""  # (required) AlpacaEval eval set (.json/.jsonl) or Arena-Hard question.jsonl
    out: str = ""  # (required) model_outputs.json (alpacaeval) or model_answer/NAME.jsonl (arenahard)
    name: str = ""  # generator / model_id; "" = the policy directory's name
    samples_out: str = ""  # raw samples file; "" = beside --out (see default_samples_path)
    no_strip: bool = False  # keep leading/trailing whitespace of answers
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # names the random streams with the stream "eval/answers"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class PromptFileError(ValueError):
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
            raise PromptFileError(f"{where}: row is not an object")
        r = {"instruction": _text(row, "instruction", where, "give every row a non-empty 'instruction'")}
        if "dataset" in row:
            r["dataset"] = row["dataset"]
        out.append(r)
    if not out:
        raise PromptFileError(f"{path}: no rows")
    return out


def read_arenahard(path) -> list[dict]:
    """Arena-Hard questions: {"question_id", "turns": [{"content"}]} (single-turn, as in v0.1)."""
    out, seen = [], {}
    for where, row in iter_rows(Path(path)):
        if not isinstance(row, dict):
            raise PromptFileError(f"{where}: row is not an object")
        if "question_id" not in row:
            raise PromptFileError(f"{where}: field 'question_id' missing. Fix: Arena-Hard rows need question_id")
        qid = row["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or (isinstance(qid, str) and not qid.strip()):
            raise PromptFileError(f"{where}: field 'question_id' must be a non-empty string or an integer")
        if qid in seen:
            raise PromptFileError(f"{where}: field 'question_id' {qid!r} repeats {seen[qid]}. Fix: drop the duplicate")
        seen[qid] = where
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise PromptFileError(f"{where}: field 'turns' missing or empty. Fix: \"turns\": [{{\"content\": ...}}]")
        if len(turns) > 1:
            raise PromptFileError(f"{where}: field 'turns' has {len(turns)} turns; only single-turn questions are "
                                  "supported (Arena-Hard v0.1 is single-turn)")
        if not isinstance(turns[0], dict):
            raise PromptFileError(f"{where}: field 'turns[0]' must be an object {{\"content\": ...}}")
        content = _text(turns[0], "content", f"{where}: turns[0]", "put the question text in turns[0].content")
        out.append({"question_id": qid, "content": content})
    if not out:
        raise PromptFileError(f"{path}: no rows")
    return out


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


def arenahard_answers(questions: list[dict], responses: list[str], token_lens: list[int], model_id: str,
                      tstamp: float | None = None) -> list[dict]:
    """model_answer/{model_id}.jsonl rows, one choice with one turn each.

    Arena-Hard's show_result reads the answer length from turns[0].token_len (older versions) or
    conv_metadata.token_len (newer); both are written. Ours count the policy's tokens, not tiktoken's.
    """
    assert len(questions) == len(responses) == len(token_lens)
    tstamp = time.time() if tstamp is None else tstamp
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": [{"content": y, "token_len": n}]}], "tstamp": tstamp,
             "conv_metadata": {"token_len": n}}
            for q, y, n in zip(questions, responses, token_lens)]


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
                   dtype: str = "auto") -> list[dict]:
    """One response per prompt row {"prompt_id", "prompt"}, data-parallel; returns the samples rows in
    prompt order."""
    d = dist.init_distributed(device)
    tok = chat.load_tokenizer(policy)
    model = checkpoint.load_model(policy, dtype=dtype, device=d.device, head="lm").eval()
    s = sample_to_file(model, tok, prompts, sampling, samples_out, seed=seed, stream="eval/answers", n=1,
                       stop_ids=chat.stop_ids(tok, policy))
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
    if a.format == "arenahard" and out.name != f"{name}.jsonl":
        # v0.1's gen_judgment/show_result take the model name from the answer file's name
        raise ConfigError(f"--out {out}: Arena-Hard reads the model name from the file name, so it must "
                          f"be '{name}.jsonl'. Fix: --out {out.with_name(name + '.jsonl')} "
                          f"or --name {out.stem}")
    check_sampling(a.sampling)
    return a


def parse_args(argv=None) -> GenerateArgs:
    argv = sys.argv[1:] if argv is None else list(argv)
    return check(parse(argv, GenerateArgs(), "python eval/generate.py", __doc__))


def main(argv=None) -> dict:
    a = parse_args(argv)
    name, out = model_name(a), Path(a.out)
    # read (and validate) the prompt file before loading any model
    rows = read_alpacaeval(a.prompts) if a.format == "alpacaeval" else read_arenahard(a.prompts)
    texts = [r["instruction"] if a.format == "alpacaeval" else r["content"] for r in rows]
    prompts = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": t}]}  # ids: row order
               for i, t in enumerate(texts)]
    samples_out = Path(a.samples_out) if a.samples_out else default_samples_path(out, a.format)
    device = None if a.device == "auto" else a.device
    samples = sample_answers(a.policy, prompts, a.sampling, samples_out, a.seed, device, a.dtype)
    first = [s["responses"][0] for s in samples]
    answers = first if a.no_strip else [y.strip() for y in first]
    truncated = sum(s["finish_reasons"][0] == "length" for s in samples)
    if a.format == "alpacaeval":
        result = alpacaeval_outputs(rows, answers, name)
    else:
        lens = [response_tokens(s["finish_reasons"][0], s["num_tokens"][0]) for s in samples]
        result = arenahard_answers(rows, answers, lens, name)
    if dist.get().is_main:
        (write_json if a.format == "alpacaeval" else write_jsonl)(out, result)
        print(f"{len(result)} answers by {name} -> {out} ({truncated} hit "
              f"--sampling.max_new_tokens={a.sampling.max_new_tokens})", flush=True)
    return {"out": str(out), "n": len(result), "truncated": truncated, "samples": str(samples_out)}


if __name__ == "__main__":
    try:
        dist.run(main)
    except ConfigError as e:  # a usage error: the message names the flag, no traceback
        sys.exit(f"python eval/generate.py: error: {e}")
