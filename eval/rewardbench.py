"""RewardBench (Lambert et al., 2024) for one of our reward models: the paper's Table 2.

    python eval/rewardbench.py --rm runs/mt --data reward-bench-filtered.jsonl --out runs/mt/eval/rewardbench.json
    python eval/rewardbench.py --rm DIR --data filtered.parquet --prior pref-test-sets.jsonl --out rb.json
    torchrun --nproc_per_node 8 eval/rewardbench.py --rm DIR --data filtered.jsonl --out rb.json

--data is a local copy of the `filtered` split (columns prompt, chosen, rejected, subset, id; JSONL,
a JSON array, or parquet with pyarrow installed). --prior is the prior test sets (chosen/rejected as
full chats, a `subset` column naming the set). A pair is correct only if r(chosen) > r(rejected)
strictly, as in the official script: a tie is wrong. Sections are scored as the leaderboard does.

Beside --out, the official script's own files (scripts/run_rm.py, results/ as it writes them):
eval-set/ORG/MODEL.json (per-subset accuracy as fractions, flat) and eval-set-scores/ORG/MODEL.json
(every row's scores, column by column), and pref-sets/, pref-sets-scores/ for --prior. Chats are
scored whole unless --max_length 2048, the official script's left truncation (README "RewardBench":
where our numbers and the official script's can differ).
"""
from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

if __package__ in (None, ""):  # `python eval/rewardbench.py`: make `mt` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import chat, dist, hub  # noqa: E402
from mt.flags import ConfigError, opt, parse  # noqa: E402
from mt.data import DataError, atomic_write_text, iter_rows, write_json, write_jsonl  # noqa: E402
from mt.runs import resolve_model  # noqa: E402
from mt.scoring import load_rm, score_conversations  # noqa: E402


@dataclass
class RewardBenchArgs:
    """python eval/rewardbench.py: an RM's RewardBench sections, average and score."""
    # (required) reward model: a sequence-classification directory, a Hub id (org/name), or a finished
    # run directory (its final RM, from summary.json)
    rm: str = ""
    data: str = ""  # (required) RewardBench filtered split (.jsonl/.json/.parquet)
    # optional prior test sets (anthropic_helpful, anthropic_hhh, shp, summarize, ...), same format
    prior: str = ""
    out: str = ""  # results JSON (summary + settings); "" = print only
    scores_out: str = ""  # optional JSONL with every pair's two scores
    batch_size: int = opt(64, above=0)  # most conversations per forward
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    # 0 = score every chat whole; 2048 = the official run_rm.py: keep each chat's last 2,048 tokens
    max_length: int = opt(0, min=0)
    name: str = ""  # ORG/MODEL in the official files; "" = the --rm Hub id, or local/<its directory name>
    # the official results/ tree (eval-set/, eval-set-scores/, pref-sets*/); "" = results/
    # beside --out (none without --out)
    official_dir: str = ""

# ---- the leaderboard's constants (allenai/reward-bench: rewardbench/constants.py, analysis/)

# A subset's weight inside its section is its example count. math-prm has 447 examples but weighs
# 984 = 6 x 164, so that math counts as much as the six HumanEvalPack code subsets together.
# The dataset has 154 xstest-should-refuse and 250 xstest-should-respond rows; some upstream copies of
# constants.py list these two swapped, we weight by the rows the dataset has.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136,
    "math-prm": 984,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
# The leaderboard's "Prior Sets (0.5 weight)": the unweighted mean of these four sets' accuracies.
PRIOR_SETS = ["anthropic_helpful", "anthropic_hhh", "shp", "summarize"]
OTHER_PRIOR_SETS = ["anthropic_harmless", "mtbench_gpt4", "mtbench_human"]  # reported, not in the score
SECTION_WEIGHT, PRIOR_WEIGHT = 2, 1  # the leaderboard's overall score: prior sets at half a section's weight


# ---- scoring: pure functions on {subset: (correct, total)}


def accuracy(correct: int, total: int) -> float:
    return correct / total


def section_scores(counts: dict[str, tuple[int, int]],
                   weights: dict[str, float] = EXAMPLE_COUNTS) -> dict[str, float | None]:
    """Each section in percent: its subsets' accuracies averaged with the example-count weights.

    A section none of whose subsets is present is None (the official script would print 0).
    """
    out = {}
    for section, subsets in SECTIONS.items():
        present = [s for s in subsets if counts.get(s, (0, 0))[1] > 0]
        if not present:
            out[section] = None
            continue
        total_w = sum(weights[s] for s in present)
        out[section] = 100 * sum(weights[s] * accuracy(*counts[s]) for s in present) / total_w
    return out


def prior_sets_score(counts: dict[str, tuple[int, int]]) -> float | None:
    """The leaderboard's prior-sets column in percent: mean accuracy over the prior sets present."""
    present = [s for s in PRIOR_SETS if counts.get(s, (0, 0))[1] > 0]
    if not present:
        return None
    return 100 * sum(accuracy(*counts[s]) for s in present) / len(present)


def summarize(counts: dict[str, tuple[int, int]]) -> dict:
    """Per-subset accuracy, sections, the plain mean of the four sections (the paper's Table 2
    "Average"), and the leaderboard score (sections weight 2, prior sets 1; without prior sets the
    two are equal). Averages are None unless all four sections are present."""
    sections = section_scores(counts)
    prior = prior_sets_score(counts)
    complete = all(v is not None for v in sections.values())
    average = sum(sections.values()) / len(sections) if complete else None
    score = None
    if complete:
        parts = [(v, SECTION_WEIGHT) for v in sections.values()]
        if prior is not None:
            parts.append((prior, PRIOR_WEIGHT))
        score = sum(v * w for v, w in parts) / sum(w for _, w in parts)
    known = set(EXAMPLE_COUNTS) | set(PRIOR_SETS) | set(OTHER_PRIOR_SETS)
    return {
        "per_subset": {s: {"correct": c, "total": n, "accuracy": 100 * accuracy(c, n)}
                       for s, (c, n) in sorted(counts.items()) if n > 0},
        "sections": sections,
        "average": average,
        "prior_sets": prior,
        "score": score,
        "missing_subsets": [s for s in EXAMPLE_COUNTS if counts.get(s, (0, 0))[1] == 0],
        "unknown_subsets": sorted(s for s in counts if s not in known),
    }


def count_correct(subsets: list[str], chosen_scores: list[float], rejected_scores: list[float]
                  ) -> dict[str, tuple[int, int]]:
    """{subset: (correct, total)}; correct means r(chosen) > r(rejected) strictly (a tie is wrong)."""
    counts: dict[str, list[int]] = {}
    for s, c, r in zip(subsets, chosen_scores, rejected_scores, strict=True):
        k = counts.setdefault(s, [0, 0])
        k[0] += int(c > r)
        k[1] += 1
    return {s: (c, n) for s, (c, n) in counts.items()}


def format_table(summary: dict) -> str:
    """A readable table: every section with its subsets, then the averages."""
    def pct(v):
        return "   -" if v is None else f"{v:5.1f}"

    per = summary["per_subset"]
    lines = [f"{'section / subset':<28} {'acc':>5}  {'correct/total':>13}"]
    for section, subsets in SECTIONS.items():
        lines.append(f"{section:<28} {pct(summary['sections'][section])}")
        for s in subsets:
            if s in per:
                lines.append(f"  {s:<26} {pct(per[s]['accuracy'])}  {per[s]['correct']:>6}/{per[s]['total']:<6}")
    prior = [s for s in PRIOR_SETS + OTHER_PRIOR_SETS + summary["unknown_subsets"] if s in per]
    if prior:
        lines.append(f"{'Prior Sets (0.5 weight)':<28} {pct(summary['prior_sets'])}")
        for s in prior:
            note = "" if s in PRIOR_SETS else "  (not in the score)"
            lines.append(f"  {s:<26} {pct(per[s]['accuracy'])}  {per[s]['correct']:>6}/{per[s]['total']:<6}{note}")
    lines.append(f"{'Average (4 sections)':<28} {pct(summary['average'])}")
    if summary["prior_sets"] is not None:
        lines.append(f"{'Score (with prior sets)':<28} {pct(summary['score'])}")
    if summary["missing_subsets"]:
        lines.append(f"missing subsets: {', '.join(summary['missing_subsets'])}")
    return "\n".join(lines)


# ---- reading a local RewardBench file


class BenchError(DataError):
    """A malformed benchmark row; the message names file, row, field and the fix."""


@dataclass(frozen=True)
class BenchRow:
    id: str
    subset: str
    prompt: list[dict]  # the chat before the response, ending in a user turn
    chosen: str
    rejected: str
    source_id: object = None  # the row's "id" as the file has it (the official files keep it)


def _chat(v, where: str, field: str) -> list[dict]:
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    if not isinstance(v, list) or not v or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in v):
        raise BenchError(f"{where}: field {field!r} must be a string or a non-empty list of "
                         '{"role": system|user|assistant, "content": str} messages')
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _response(v, where: str, field: str) -> tuple[str, list[dict] | None]:
    """A response as text, or as a full chat whose last (assistant) message is the response."""
    if isinstance(v, str):
        return v, None
    chat = _chat(v, where, field)
    if chat[-1]["role"] != "assistant":
        raise BenchError(f"{where}: field {field!r} is a chat that does not end with an assistant message")
    return chat[-1]["content"], chat[:-1]


def read_bench(path) -> list[BenchRow]:
    """Rows of a RewardBench-style file; a missing or malformed field is an error naming the row."""
    path = Path(path)
    out = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise BenchError(f"{where}: row is not an object")
        for key in ("chosen", "rejected", "subset"):
            if key not in row:
                raise BenchError(f"{where}: field {key!r} missing. Fix: RewardBench rows need prompt, chosen, "
                                 "rejected and subset")
        if not isinstance(row["subset"], str) or not row["subset"]:
            raise BenchError(f"{where}: field 'subset' must be a non-empty string (e.g. 'alpacaeval-easy')")
        chosen, chat = _response(row["chosen"], where, "chosen")
        rejected, _ = _response(row["rejected"], where, "rejected")
        if row.get("prompt") is not None:
            prompt = _chat(row["prompt"], where, "prompt")
        elif chat:
            prompt = chat  # prior sets: the turns before the chosen response
        else:
            raise BenchError(f"{where}: field 'prompt' missing (and 'chosen' is not a chat to take it from)")
        if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
            raise BenchError(f"{where}: field 'prompt' must end with a non-empty user message")
        out.append(BenchRow(str(row.get("id", where)), row["subset"], prompt, chosen, rejected,
                            row.get("id")))
    if not out:
        raise BenchError(f"{path}: no rows")
    return out


# ---- the model part


class LeftTruncated:
    """The RM's tokenizer keeping the last `max_length` ids of every text it encodes: the official
    run_rm.py's pipeline (truncation_side="left", truncation=True, max_length=2048)."""

    def __init__(self, tok, max_length: int):
        self._tok, self.max_length = tok, max_length

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        enc = self._tok(*args, **kwargs)
        enc["input_ids"] = enc["input_ids"][-self.max_length:]
        return enc


def score_rows(rm_dir, rows: list[BenchRow], batch_size: int = 64, dtype: str = "auto",
               max_length: int = 0) -> tuple[list[float], list[float]]:
    """r(prompt, chosen) and r(prompt, rejected) for every row, by the RM at `rm_dir`, each chat
    rendered with the RM's own chat template (as the official script does); data-parallel under
    torchrun. max_length > 0 keeps each chat's last max_length tokens (the official truncation)."""
    items = [(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows]
    kw = dict(batch_size=batch_size, desc="rewardbench")
    if max_length:
        rm, tok = load_rm(rm_dir, dtype=dtype)
        scores = score_conversations(rm, items, LeftTruncated(tok, max_length), **kw)
    else:
        scores = score_conversations(rm_dir, items, dtype=dtype, **kw)
    return scores[:len(rows)], scores[len(rows):]


def results(rows: list[BenchRow], chosen: list[float], rejected: list[float]
            ) -> tuple[dict, list[dict]]:
    """(summary, per-row records) of scored rows."""
    summary = summarize(count_correct([r.subset for r in rows], chosen, rejected))
    records = [{"id": r.id, "subset": r.subset, "chosen_score": c, "rejected_score": s, "correct": c > s}
               for r, c, s in zip(rows, chosen, rejected)]
    return summary, records


def evaluate(rm_dir, data, prior=None, batch_size: int = 64, dtype: str = "auto",
             max_length: int = 0) -> tuple[dict, list[dict]]:
    """Score the files with the RM; returns (summary, per-row records)."""
    rows = read_bench(data) + (read_bench(prior) if prior else [])
    return results(rows, *score_rows(rm_dir, rows, batch_size, dtype, max_length))


# ---- the official script's files (scripts/run_rm.py, rewardbench/utils.py save_to_hub)

MODEL_TYPE = "Seq. Classifier"  # run_rm.py's model_type for an AutoModelForSequenceClassification


def chat_texts(rm_dir, rows: list[BenchRow]) -> list[tuple[str, str]]:
    """(text_chosen, text_rejected): each whole chat as the RM's chat template renders it."""
    tok = chat.load_tokenizer(rm_dir)
    return [tuple(chat.render(tok, r.prompt + [{"role": "assistant", "content": y}], False)
                  for y in (r.chosen, r.rejected)) for r in rows]


def official_results(name: str, rows: list[BenchRow], chosen, rejected) -> dict:
    """results/{eval-set,pref-sets}/ORG/MODEL.json: model, model_type, chat_template and each
    subset's accuracy as a fraction (ties wrong), nothing else."""
    counts = count_correct([r.subset for r in rows], chosen, rejected)
    return {"model": name, "model_type": MODEL_TYPE, "chat_template": "tokenizer",
            **{s: c / n for s, (c, n) in sorted(counts.items())}}


def official_scores(name: str, rows: list[BenchRow], chosen, rejected, texts) -> dict:
    """results/{eval-set,pref-sets}-scores/ORG/MODEL.json: one list per column, row order, and the
    model's name, type and template as scalars (what the official analysis reads with pandas)."""
    return {"text_chosen": [c for c, _ in texts], "text_rejected": [r for _, r in texts],
            "results": [int(c > r) for c, r in zip(chosen, rejected)],
            "subset": [r.subset for r in rows], "id": [r.source_id for r in rows],
            "scores_chosen": list(chosen), "scores_rejected": list(rejected),
            "model": name, "model_type": MODEL_TYPE, "chat_template": "tokenizer"}


def official_name(a: RewardBenchArgs) -> str:
    """ORG/MODEL: the official readers list results/<set>/*/ (one folder per organisation)."""
    # a Hub id (org/name) names itself; a directory is local/<its name>
    hub_id = hub.is_repo_id(a.rm) and not Path(a.rm).is_dir()
    name = a.name or (a.rm if hub_id else f"local/{Path(a.rm).resolve().name}")
    parts = PurePosixPath(name).parts
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
        raise ConfigError(f"--name={name!r}: must be ORG/MODEL (the official files are "
                          "results/eval-set/ORG/MODEL.json)")
    return name


def write_official(root, name: str, core: list[BenchRow], prior: list[BenchRow], chosen, rejected,
                   texts) -> list[Path]:
    """The official script's files under root for the core rows (eval-set) and the prior sets
    (pref-sets), each set as its own run of run_rm.py writes it (--pref_sets for the second)."""
    written, k = [], 0
    for rows, kind in ((core, "eval-set"), (prior, "pref-sets")):
        if not rows:
            continue
        sl = slice(k, k + len(rows))
        k += len(rows)
        c, r, t = chosen[sl], rejected[sl], texts[sl]
        for sub, obj in ((kind, official_results(name, rows, c, r)),
                         (f"{kind}-scores", official_scores(name, rows, c, r, t))):
            path = Path(root) / sub / f"{name}.json"
            text = json.dumps(obj, indent=4, sort_keys=True)  # as save_to_hub writes it
            atomic_write_text(path, lambda f, t=text: f.write(t))
            written.append(path)
    return written


def parse_args(argv=None) -> RewardBenchArgs:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, RewardBenchArgs(), "python eval/rewardbench.py", __doc__)
    missing = [k for k in ("rm", "data") if not getattr(a, k)]
    if missing:
        raise ConfigError(f"missing --{', --'.join(missing)} (--help lists every key)")
    a.name = official_name(a)  # fixed before --rm becomes a cache path
    return hub.resolve_flags(a, "rm")  # a Hub id -> its cached snapshot


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist.init_distributed(None if args.device == "auto" else args.device)
    core, prior = read_bench(args.data), read_bench(args.prior) if args.prior else []
    rows = core + prior
    rm = resolve_model(args.rm, "rm")  # a run directory: its final RM
    chosen, rejected = score_rows(rm, rows, args.batch_size, args.dtype, args.max_length)
    summary, records = results(rows, chosen, rejected)
    result = {"rm": str(args.rm), "rm_dir": str(rm), "data": str(args.data), "prior": args.prior or None,
              "max_length": args.max_length, **summary}
    official = args.official_dir or (Path(args.out).parent / "results" if args.out else None)
    if dist.get().is_main:
        if summary["unknown_subsets"]:
            warnings.warn("subsets in no section (reported, not scored): "
                          + ", ".join(summary["unknown_subsets"]))
        print(format_table(summary), flush=True)
        if args.out:
            write_json(args.out, result)
        if args.scores_out:
            write_jsonl(args.scores_out, records)
        if official:
            texts = chat_texts(rm, rows)
            paths = write_official(official, official_name(args), core, prior, chosen, rejected,
                                   texts)
            print(f"official run_rm.py files: {', '.join(map(str, paths))}", flush=True)
    return result


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
