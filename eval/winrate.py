r"""RM-judged comparisons: one policy's win rate against another (Eq. 6), and an RM's accuracy on pairs.

    # two samples files (e.g. from `python -m mt.sampler`), first response of each prompt
    python eval/winrate.py --rm DIR --new new.samples.jsonl --old old.samples.jsonl --out wr.json
    # sample one response per prompt from both policies first (written to --samples_dir)
    python eval/winrate.py --rm runs/mt --new_policy runs/mt --old_policy base --prompts test.jsonl \
        --samples_dir wr/ --out wr.json
    # accuracy of an RM on a pairs file (e.g. held-out pseudo-pairs; --kept_only drops filtered ones)
    python eval/winrate.py --rm DIR --pairs iter1/pseudo_pairs.jsonl --out acc.json

Eq. 6 counts a win only if r(y_new) > r(y_old) strictly; a tie is not a win and is reported on its
own, as are losses. Accuracy likewise: a pair is correct only if r(chosen) > r(rejected).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python eval/winrate.py`: make `mt` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mt import chat, checkpoint, dist, hub  # noqa: E402
from mt.config import SamplingConfig  # noqa: E402
from mt.flags import ConfigError, opt, parse  # noqa: E402
from mt.data import DataError, ReadReport, read_pairs, read_prompts, read_samples, write_json  # noqa: E402
from mt.em import win_rate  # noqa: E402  (Eq. 6, shared with model selection)
from mt.manifest import hold_run_dir  # noqa: E402
from mt.runs import resolve_model  # noqa: E402
from mt.sampler import check_sampling, require, sample_to_file, summary_line  # noqa: E402
from mt.scoring import score_conversations  # noqa: E402


@dataclass
class WinrateArgs:
    """python eval/winrate.py: one of three modes, --new/--old, --new_policy/--old_policy/--prompts, --pairs."""
    # (required) the judge: an RM directory, a Hub id (org/name), or a run directory (its final RM)
    rm: str = ""
    new: str = ""  # samples file of the new policy (with --old)
    old: str = ""  # samples file of the old policy (with --new)
    new_policy: str = ""  # new policy directory (or a run: its selected policy), sampled on --prompts
    old_policy: str = ""  # old policy directory (or a run: its selected policy), sampled on --prompts
    prompts: str = ""  # prompt file for --new_policy/--old_policy
    samples_dir: str = "winrate_samples"  # where sampled responses are written
    pairs: str = ""  # pairs file: report the RM's accuracy instead of a win rate
    kept_only: bool = False  # with --pairs: only rows with kept=true
    skip_bad_rows: bool = False  # with --pairs: skip (and list) malformed rows
    out: str = ""  # results JSON; "" = print only
    batch_size: int = opt(64, above=0)  # most conversations per RM forward
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda | cuda:N
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0  # sampling seed, with --new_policy/--old_policy
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

# ---- pure functions


def judge(new_scores: list[float], old_scores: list[float]) -> dict:
    """Eq. 6 over aligned scores: wins, ties, losses and their rates (a tie is not a win)."""
    res = win_rate(new_scores, old_scores)
    n = res["n"]
    return {**res, "tie_rate": res["ties"] / n, "loss_rate": res["losses"] / n}


def pair_accuracy(chosen_scores: list[float], rejected_scores: list[float]) -> dict:
    """Share of pairs with r(chosen) > r(rejected) strictly; ties are wrong and counted apart."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("pair_accuracy needs aligned, non-empty score lists")
    n = len(chosen_scores)
    correct = sum(c > r for c, r in zip(chosen_scores, rejected_scores))
    ties = sum(c == r for c, r in zip(chosen_scores, rejected_scores))
    return {"correct": correct, "ties": ties, "wrong": n - correct - ties, "n": n, "accuracy": correct / n}


def align(new: list, old: list, new_path="new", old_path="old") -> tuple[list[list[dict]], list[str], list[str], dict]:
    """(prompts, y_new, y_old) from two samples files, matched by prompt id, first response of each.

    Both files must hold the same prompts (by id, with the same messages); anything else is an error
    naming the ids, since a win rate over different prompt sets compares nothing.
    """
    by_old = {s["prompt_id"]: s for s in old}
    ids_new, ids_old = [s["prompt_id"] for s in new], set(by_old)
    only_new = [i for i in ids_new if i not in ids_old]
    only_old = sorted(ids_old - set(ids_new))
    if only_new or only_old:
        raise DataError(f"{new_path} and {old_path} hold different prompts: {len(only_new)} only in {new_path} "
                         f"(e.g. {only_new[:3]}), {len(only_old)} only in {old_path} (e.g. {only_old[:3]}). "
                         "Fix: sample both policies on the same prompt file")
    prompts, y_new, y_old = [], [], []
    truncated = {"new": 0, "old": 0}
    for s in new:
        o = by_old[s["prompt_id"]]
        if o["prompt"] != s["prompt"]:
            raise DataError(f"prompt_id {s['prompt_id']!r}: the prompt differs between {new_path} and "
                             f"{old_path}. Fix: sample both policies on the same prompt file")
        prompts.append(s["prompt"])
        y_new.append(s["responses"][0])
        y_old.append(o["responses"][0])
        truncated["new"] += s["finish_reasons"][0] == "length"
        truncated["old"] += o["finish_reasons"][0] == "length"
    return prompts, y_new, y_old, truncated


# ---- the model part


def score(rm_dir, prompts: list[list[dict]], responses: list[str], batch_size: int = 64, dtype: str = "auto"
          ) -> list[float]:
    """r(x, y) for aligned prompts and responses, by the RM at `rm_dir` (data-parallel under torchrun)."""
    return score_conversations(rm_dir, list(zip(prompts, responses)), batch_size=batch_size, dtype=dtype,
                               desc="judging")


def compare_samples(rm_dir, new_path, old_path, batch_size=64, dtype="auto") -> dict:
    """Eq. 6 win rate of the `new` samples over the `old` ones, judged by the RM."""
    prompts, y_new, y_old, truncated = align(read_samples(new_path), read_samples(old_path), new_path, old_path)
    s = score(rm_dir, prompts + prompts, y_new + y_old, batch_size, dtype)
    res = judge(s[:len(prompts)], s[len(prompts):])
    return {**res, "truncated_new": truncated["new"], "truncated_old": truncated["old"]}


def sample_policies(new_policy, old_policy, prompts_path, samples_dir, sampling, seed=0, dtype="auto"
                    ) -> tuple[Path, Path]:
    """One response per prompt from each policy, written as samples files; returns their paths."""
    d = dist.get()
    hold_run_dir(Path(samples_dir))  # one writer at a time: a second is refused, naming this one
    prompts = read_prompts(prompts_path)
    paths = []
    for name, policy in (("new", new_policy), ("old", old_policy)):
        out = Path(samples_dir) / f"{name}.samples.jsonl"
        tok = chat.load_tokenizer(policy)
        model = checkpoint.load_model(policy, dtype=dtype, device=d.device, head="lm").eval()
        # distinct streams: the two policies' samples are drawn independently, as in Eq. 6
        s = sample_to_file(model, tok, prompts, sampling, out, seed=seed, stream=f"winrate/{name}", n=1,
                           stop_ids=chat.stop_ids(tok, policy), source=prompts_path)
        dist.print0(f"{name} policy {policy}: " + summary_line(s) + f" -> {out}")
        del model
        paths.append(out)
    return paths[0], paths[1]


def accuracy_on_pairs(rm_dir, pairs_path, kept_only=False, skip_bad_rows=False, batch_size=64, dtype="auto"
                      ) -> dict:
    """The RM's accuracy on a pairs file (chosen must score strictly higher)."""
    report = ReadReport()
    pairs = read_pairs(pairs_path, on_error="skip" if skip_bad_rows else "raise", report=report)
    dropped = 0
    if kept_only:  # pseudo_pairs.jsonl marks every pair kept or dropped by the filter (Sec. 4.3)
        kept = [p for p in pairs if p.get("kept", True)]
        dropped, pairs = len(pairs) - len(kept), kept
        if not pairs:
            raise DataError(f"{pairs_path}: no pair has kept=true. Fix: give a pairs file with kept "
                            "pairs, or --kept_only false")
    prompts = [p["prompt"] for p in pairs]
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    s = score(rm_dir, prompts + prompts, responses, batch_size, dtype)
    return {**pair_accuracy(s[:len(pairs)], s[len(pairs):]), "skipped_rows": report.skipped,
            "dropped_not_kept": dropped}


# ---- command line


def check(a: WinrateArgs) -> WinrateArgs:
    """Usage errors, before any file is read: exactly one mode, with all of its flags."""
    require(a, "rm")
    modes = [bool(a.new or a.old), bool(a.new_policy or a.old_policy or a.prompts), bool(a.pairs)]
    if sum(modes) != 1:
        raise ConfigError("give exactly one of: --new/--old, --new_policy/--old_policy/--prompts, --pairs")
    if modes[0] and not (a.new and a.old):
        raise ConfigError("--new and --old go together")
    if modes[1] and not (a.new_policy and a.old_policy and a.prompts):
        raise ConfigError("--new_policy, --old_policy and --prompts go together")
    check_sampling(a.sampling)
    return a


def parse_args(argv=None) -> WinrateArgs:
    argv = sys.argv[1:] if argv is None else list(argv)
    return check(parse(argv, WinrateArgs(), "python eval/winrate.py", __doc__))


def main(argv=None) -> dict:
    a = hub.resolve_flags(parse_args(argv), "rm", "new_policy", "old_policy")  # Hub ids -> snapshots
    dist.init_distributed(None if a.device == "auto" else a.device)
    rm = resolve_model(a.rm, "rm")  # a run directory: its final RM
    if a.pairs:
        res = {"mode": "accuracy", "rm": a.rm, "pairs": a.pairs,
               **accuracy_on_pairs(rm, a.pairs, a.kept_only, a.skip_bad_rows, a.batch_size, a.dtype)}
        line = (f"accuracy {100 * res['accuracy']:.1f}% ({res['correct']}/{res['n']} correct, "
                f"{res['ties']} ties, {res['wrong']} wrong)")
    else:
        new, old = a.new, a.old
        if a.new_policy:
            new, old = sample_policies(resolve_model(a.new_policy, "policy"),
                                       resolve_model(a.old_policy, "policy"), a.prompts, a.samples_dir, a.sampling,
                                       a.seed, a.dtype)
        res = {"mode": "win_rate", "rm": a.rm, "new": str(new), "old": str(old),
               **compare_samples(rm, new, old, a.batch_size, a.dtype)}
        line = (f"win rate {100 * res['win_rate']:.1f}% ({res['wins']} wins, {res['ties']} ties, "
                f"{res['losses']} losses of {res['n']}; strict r(new) > r(old), Eq. 6)")
    if dist.get().is_main:
        print(line, flush=True)
        if a.out:
            write_json(a.out, res)
    return res


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
