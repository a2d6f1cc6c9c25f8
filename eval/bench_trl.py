"""Our training step against TRL's: DPO against DPOTrainer, Bradley-Terry against RewardTrainer;
tokens/s on one model, the same pairs and settings, alternated in one process.

    pip install trl                       # optional; not a project dependency
    python eval/bench_trl.py              # DPO, small Llama, fp32, this CPU, 3 × (ours, TRL)
    python eval/bench_trl.py --objective rm --lengths ultrafeedback --seq 512 --batch 8
    python eval/bench_trl.py --repeats 5 --steps 6 --out bench_trl.json
    python eval/bench_trl.py --seq 512 --micro 1 --batch 4 --threads 2 --layout padded

One random Llama (eval/bench_train.py's shape, fp32; an LM head for DPO, a one-output score head
for the RM) is saved once as a Hugging Face directory; every run loads a fresh copy of it: ours
with mt.checkpoint.load_model, trained by mt/train.py's loop with mt.losses.preference_objective
("dpo") or BRADLEY_TERRY (as eval/bench_train.py runs them), TRL's as transformers'
LlamaForCausalLM / LlamaForSequenceClassification, trained by trl.DPOTrainer / trl.RewardTrainer.
Both get the same random pairs: --lengths fixed (bench_train's builder: chosen and rejected `seq`
tokens each, a quarter prompt) or ultrafeedback (bench_train's spread_examples: its SPREAD, an
UltraFeedback-like assumption, scaled so the 2,048-token cap is --seq). Our micro-batches are
--layout packed (mt/packing.py: no padding, the prompt once per pair) or padded (rows padded to
the longest, the reference layout). TRL uses its own padding-free option where the installed
release has one: DPOConfig(padding_free=True) is asked for, and the result records whether the
trainer kept it (TRL 1.16 warns and falls back to padding); RewardTrainer has none (its collator
pads each micro-batch). Each optimizer step holds the same pairs on both sides: our steps'
pairs (mt/train.py global_batches), handed to TRL in that order, longest first within a step as
our padded layout orders them, through transformers' sequential sampler. The same batch and
micro-batch (TRL: per-device batch = --micro, accumulation = --batch / --micro; our packed
micro-batches hold the same token budget, micro × the longest pair), β, lr and AdamW
(torch.optim.AdamW on both sides; weight decay 0, betas 0.9/0.999, clip 1.0, cosine schedule
without warmup), no activation checkpointing, and for DPO reference log-probs precomputed
before training (TRL: precompute_ref_log_probs=True), which is not timed. TRL's tokenising is
skipped (the pairs are handed over as its tokenized columns); its reporting, logging, saving and
progress bar are off.

The runs alternate, ours then TRL, --repeats times, so a change in machine load falls on both.
Each run times its optimizer steps after the first (warm-up): from the end of step 1 to the end of
the last, with every step's collation, forward, backward, clipping, optimizer and bookkeeping.
tokens/s counts the real tokens through the model (chosen and rejected rows, the prompt in both;
no padding), the same count on both sides; each side's padding fraction (the share of computed
positions that were padding) is reported beside it. Step memory is the resident-set rise over
the training call (eval/bench_train.py's StepMemory). The Markdown table gives each repeat, then
the medians and ours/TRL; --out writes the runs, the versions (torch, transformers, trl,
accelerate, datasets) and the settings as JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import (LlamaForCausalLM, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast, TrainerCallback)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_policy  # noqa: E402
from eval.bench_train import SHAPES, StepMemory, examples, spread_examples  # noqa: E402
from mt import dist  # noqa: E402
from mt import train as T  # noqa: E402
from mt.chat import Example  # noqa: E402
from mt.checkpoint import load_model, save_hf  # noqa: E402
from mt.config import DPOConfig, RMConfig  # noqa: E402
from mt.flags import opt, parse  # noqa: E402
from mt.data import write_json  # noqa: E402
from mt.errors import UserError  # noqa: E402
from mt.losses import BRADLEY_TERRY, preference_objective  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402


@dataclass
class BenchTRLArgs:
    """python eval/bench_trl.py: tokens/s of our training step and TRL's, alternated."""
    # dpo: ours against trl.DPOTrainer; rm: our Bradley-Terry step against trl.RewardTrainer
    objective: str = opt("dpo", choices=("dpo", "rm"))
    # fixed: every sequence --seq; ultrafeedback: bench_train's SPREAD scaled to a --seq cap
    lengths: str = opt("fixed", choices=("fixed", "ultrafeedback"))
    layout: str = opt("packed", choices=("packed", "padded"))  # ours (--dpo.packing); TRL: its own
    model: str = opt("small", choices=tuple(sorted(SHAPES)))  # eval/bench_train.py's shape
    seq: int = opt(256, above=0)  # tokens per sequence (chosen and rejected each)
    micro: int = opt(2, above=0)  # pairs per forward
    batch: int = opt(4, above=0)  # pairs per optimizer step
    steps: int = opt(4, above=0)  # timed steps per run (after one warm-up step)
    repeats: int = opt(3, above=0)  # runs of each side, alternating ours, TRL, ours, TRL, ...
    beta: float = opt(0.1, above=0)
    lr: float = opt(1e-6, above=0)
    threads: int = opt(0, min=0)  # CPU threads (0 = torch's default)
    out: str = ""  # write the results here as JSON ("" = print only)


def require_trl():
    """trl and datasets (its dependency), or one UserError saying how to install them."""
    try:
        # optional: only this benchmark loads trl, and only when it runs (not a dependency)
        import datasets
        import trl
        # trl's top module is lazy: loading the trainer is what fails when a dependency is missing
        import trl.trainer.dpo_trainer  # noqa: F401
        import trl.trainer.reward_trainer  # noqa: F401
    except ImportError as e:
        raise UserError(f"eval/bench_trl.py: TRL is not importable here ({e}); it is "
                        "optional, not in requirements.txt. Fix: pip install trl") from e
    return trl, datasets


def trl_rows(pairs: list[Example], objective: str = "dpo") -> dict[str, list[list[int]]]:
    """Our pairs as TRL's tokenized preference columns: for DPO the shared prompt, then each
    response; for the RM (RewardTrainer's columns) each whole sequence, prompt included."""
    if objective == "rm":
        return {"chosen_ids": [list(e.chosen) for e in pairs],
                "rejected_ids": [list(e.rejected) for e in pairs]}
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for e in pairs:
        p = e.chosen_start
        if e.rejected_start != p or e.chosen[:p] != e.rejected[:p]:
            # TRL's collator puts one prompt before both responses
            raise ValueError(f"pair {e.key}: chosen and rejected do not share one prompt")
        rows["prompt_ids"].append(list(e.chosen[:p]))
        rows["chosen_ids"].append(list(e.chosen[p:]))
        rows["rejected_ids"].append(list(e.rejected[p:]))
    return rows


def row_lengths(rows: dict[str, list[list[int]]]) -> list[tuple[int, int]]:
    """The two rows TRL's collator builds per pair, (chosen, rejected) lengths: the prompt (a
    column of its own for DPO) before each response."""
    prompts = rows.get("prompt_ids", [[]] * len(rows["chosen_ids"]))
    return [(len(p) + len(c), len(p) + len(r))
            for p, c, r in zip(prompts, rows["chosen_ids"], rows["rejected_ids"])]


def pair_tokens(rows: dict[str, list[list[int]]]) -> list[int]:
    """Tokens each TRL pair puts through the model: the prompt in both rows, then each response
    (what Example.num_tokens counts for ours, and TRL's attention-mask sum without padding)."""
    return [c + r for c, r in row_lengths(rows)]


def step_order(num_tokens: list[int], batch: int, micro: int) -> list[int]:
    """Our pairs in the order our steps take them (mt/train.py global_batches, seed 0), longest
    first within a step as our padded layout's micro-batches take them (rank_micro_batches), so
    TRL's sequential sampler gives each step, and each padded micro-batch, the same pairs."""
    return [i for b in T.global_batches(len(num_tokens), batch, 1, 0)
            for m in T.rank_micro_batches(b, num_tokens, 0, 1, micro) for i in m]


def padded_fraction(lengths: list[tuple[int, int]], order: list[int], micro: int) -> float:
    """The padding share of the positions a collator computes that pads each micro-batch's 2·micro
    rows (chosen and rejected together) to its longest, taking pairs in `order`: TRL's."""
    slots = tokens = 0
    for s in range(0, len(order), micro):
        m = [lengths[i] for i in order[s:s + micro]]
        slots += 2 * len(m) * max(max(x) for x in m)
        tokens += sum(c + r for c, r in m)
    return 1 - tokens / slots


def build_model(a: BenchTRLArgs, out: Path) -> tuple[Path, int]:
    """The one random Llama both sides start from, fp32, as a Hugging Face directory (a
    LlamaForSequenceClassification with one output for the RM)."""
    shape = {"model_type": "llama", "max_position_embeddings": max(4096, a.seq), **SHAPES[a.model]}
    head = "score" if a.objective == "rm" else "lm"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(shape, head=head))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    save_hf(model, out, torch.float32)
    return out, shape["vocab_size"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer for TRL's checks (its pad token is id 0, as ours); the pairs come tokenized."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1},
                                                           unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


class StepClock(TrainerCallback):
    """The end of every optimizer step of a transformers Trainer (after its optimizer step)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def run_ours(a: BenchTRLArgs, hf_dir: Path, pairs: list[Example], tmp: Path) -> dict:
    model = load_model(hf_dir)  # fp32, CPU; the directory's head (LM or score)
    kw = dict(lr=a.lr, batch_size=a.batch, micro_batch_size=a.micro, save_every=0,
              warmup_ratio=0.0, activation_checkpointing=False, dtype="fp32", max_length=a.seq,
              packing=a.layout == "packed")
    cfg = DPOConfig(beta=a.beta, **kw) if a.objective == "dpo" else RMConfig(**kw)
    model = dist.prepare_model(model, cfg, torch.device("cpu"))
    refs = (train_policy.reference_logps(model, pairs, a.micro, progress=False,
                                         packing=cfg.packing)
            if a.objective == "dpo" else None)
    obj = preference_objective("dpo") if a.objective == "dpo" else BRADLEY_TERRY
    with StepMemory(torch.device("cpu")) as mem:
        T.train(model, pairs, obj, cfg, tmp, ref_logps=refs, progress=False,
                save_dtype=torch.bfloat16)  # the final save is after the clock
    rows = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # step 1 is warm-up (allocator, lazy init)
    seconds = timed[-1]["elapsed"] - rows[0]["elapsed"]
    return {"impl": "ours", "steps_timed": len(timed), "seconds": seconds,
            "tokens_timed": sum(r["tokens"] for r in timed), "step_memory_gib": mem.peak / 2**30,
            "pad_fraction": sum(r["pad_fraction"] for r in timed) / len(timed),
            "last_loss": rows[-1]["loss"], "refs": refs}


def run_trl(trl, datasets, a: BenchTRLArgs, hf_dir: Path, rows: dict, order: list[int],
            tmp: Path) -> dict:
    """TRL's trainer on `rows` taken in `order` (our steps' pairs); refs, for DPO, by pair index."""
    common = dict(
        output_dir=str(tmp), per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=a.batch // a.micro, max_steps=a.steps + 1, learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, bf16=False, fp16=False,
        use_cpu=True, activation_checkpointing=False, max_length=a.seq, report_to="none",
        logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=0, train_sampling_strategy="sequential")  # sequential: our steps' pairs, in order
    if a.objective == "dpo":
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        # TRL's own padding-free option, asked for; whether the trainer kept it is recorded
        args = trl.DPOConfig(**common, beta=a.beta, loss_type=["sigmoid"],
                             precompute_ref_log_probs=True, padding_free=True)
        base = trl.DPOTrainer
    else:
        model = LlamaForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32,
                                                               num_labels=1)
        args = trl.RewardConfig(**common)  # RewardTrainer has no padding-free option
        base = trl.RewardTrainer

    class PreTokenized(base):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already TRL's tokenized columns: no text to tokenise

    clock = StepClock()
    data = datasets.Dataset.from_dict({k: [v[i] for i in order] for k, v in rows.items()})
    trainer = PreTokenized(model=model, args=args, train_dataset=data,
                           processing_class=tiny_tokenizer(), callbacks=[clock])
    refs = None
    if a.objective == "dpo":
        ds = trainer.train_dataset
        refs = dict(zip(order, zip(ds["ref_chosen_logps"], ds["ref_rejected_logps"])))
    with StepMemory(torch.device("cpu")) as mem:
        trainer.train()
    if len(clock.ends) != a.steps + 1:
        raise RuntimeError(f"TRL ran {len(clock.ends)} optimizer steps, expected {a.steps + 1}")
    counts = pair_tokens(rows)
    if trainer._total_train_tokens != sum(counts):  # TRL's own count: every pair once, no cut
        raise RuntimeError(f"TRL saw {trainer._total_train_tokens} tokens, expected "
                           f"{sum(counts)}")
    return {"impl": "trl", "steps_timed": a.steps, "seconds": clock.ends[-1] - clock.ends[0],
            "tokens_timed": sum(counts[i] for i in order[a.batch:]),  # after step 1
            "step_memory_gib": mem.peak / 2**30,
            "pad_fraction": padded_fraction(row_lengths(rows), order[a.batch:], a.micro),
            "trl_padding_free": bool(getattr(trainer, "padding_free", False)),
            "trl_tokens_seen": trainer._total_train_tokens, "refs": refs}


def versions(trl, datasets) -> dict:
    import accelerate  # optional: trl's dependency, present with it
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def table(runs: list[dict]) -> str:
    """Markdown: one line per repeat (ours, TRL), then the medians."""
    lines = ["| repeat | ours tokens/s | TRL tokens/s | ours/TRL | ours s/step | TRL s/step "
             "| ours step RSS rise GiB | TRL step RSS rise GiB |",
             "|---|---|---|---|---|---|---|---|"]
    by = {i: [r for r in runs if r["impl"] == i] for i in ("ours", "trl")}

    def line(name, o, t):
        return (f"| {name} | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                f"{o['tokens_per_s'] / t['tokens_per_s']:.2f} | {o['seconds_per_step']:.3f} | "
                f"{t['seconds_per_step']:.3f} | {o['step_memory_gib']:.3f} | "
                f"{t['step_memory_gib']:.3f} |")
    for o, t in zip(by["ours"], by["trl"]):
        lines.append(line(str(o["repeat"]), o, t))
    lines.append(line("median", *(summary(by[i]) for i in ("ours", "trl"))))
    return "\n".join(lines)


def summary(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs)
            for k in ("tokens_per_s", "seconds_per_step", "step_memory_gib")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, BenchTRLArgs(), "python eval/bench_trl.py", __doc__)
    if a.batch % a.micro:
        raise UserError(f"--batch {a.batch} is not a multiple of --micro {a.micro}. Fix: make "
                        "it one (both sides accumulate batch / micro forwards)")
    trl, datasets = require_trl()  # before any work: without TRL there is nothing to compare
    datasets.disable_progress_bars()  # its map bars would bury the table
    if a.threads:
        torch.set_num_threads(a.threads)
    dist.init_distributed("cpu")
    ver = versions(trl, datasets)
    dist.print0(f"cpu ({torch.get_num_threads()} threads); "
                + ", ".join(f"{k} {v}" for k, v in ver.items())
                + f"; command: python eval/bench_trl.py {' '.join(argv)}")
    runs, ref_diff = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir, vocab = build_model(a, tmp / "init")
        make = spread_examples if a.lengths == "ultrafeedback" else examples
        pairs = make(a.batch * (a.steps + 1), a.seq, vocab)
        rows = trl_rows(pairs, a.objective)
        counts = pair_tokens(rows)
        if counts != [e.num_tokens for e in pairs]:  # one real-token count for both sides
            raise RuntimeError("TRL's rows do not hold our pairs' tokens")
        order = step_order(counts, a.batch, a.micro)
        for rep in range(1, a.repeats + 1):
            ours = run_ours(a, hf_dir, pairs, tmp / f"ours-{rep}")
            trl_run = run_trl(trl, datasets, a, hf_dir, rows, order, tmp / f"trl-{rep}")
            if ours["tokens_timed"] != trl_run["tokens_timed"]:  # the same pairs in each step
                raise RuntimeError(f"timed tokens differ: ours {ours['tokens_timed']}, TRL "
                                   f"{trl_run['tokens_timed']}")
            if a.objective == "dpo":  # each pair's reference log-probs, ours against TRL's
                ref_diff = max([ref_diff] + [abs(x - y) for i, e in enumerate(pairs)
                                             for x, y in zip(ours["refs"][e.key],
                                                             trl_run["refs"][i])])
            for r in (ours, trl_run):
                r.pop("refs")
                r.update(repeat=rep, seconds_per_step=r["seconds"] / r["steps_timed"],
                         tokens_per_s=r["tokens_timed"] / r["seconds"])
                runs.append(r)
                dist.print0(f"repeat {rep} {r['impl']:>4}: {r['tokens_per_s']:,.0f} tokens/s, "
                            f"{r['seconds_per_step']:.3f} s/step, step memory "
                            f"{r['step_memory_gib']:.3f} GiB, padding "
                            f"{100 * r['pad_fraction']:.1f}%")
    med = {i: summary([r for r in runs if r["impl"] == i]) for i in ("ours", "trl")}
    ratio = med["ours"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    trainer = "DPOTrainer" if a.objective == "dpo" else "RewardTrainer"
    pf = runs[-1]["trl_padding_free"]
    dist.print0(f"\n{a.objective.upper()} step, {a.model} Llama fp32 on CPU: {a.batch} pairs/step "
                f"in micro-batches of {a.micro}, {a.lengths} lengths, seq {a.seq} "
                f"({ours['tokens_timed'] / a.steps:,.0f} real tokens/step), {a.steps} timed steps "
                f"per run, lr {a.lr}{f', β {a.beta}' if a.objective == 'dpo' else ''}; ours "
                f"{a.layout}, TRL {trainer} {'padding-free' if pf else 'padded'}\n")
    dist.print0(table(runs))
    line = (f"\nours/TRL tokens/s (medians): {ratio:.2f}; padding ours "
            f"{100 * ours['pad_fraction']:.1f}%, TRL {100 * trl_run['pad_fraction']:.1f}%")
    if a.objective == "dpo":
        line += f"; reference log-probs, max |ours - TRL| = {ref_diff:.2e}"
    dist.print0(line)
    result = {"command": f"python eval/bench_trl.py {' '.join(argv)}", "settings": asdict(a),
              "threads": torch.get_num_threads(), "versions": ver,
              "tokens_timed_per_run": ours["tokens_timed"], "trl_padding_free": pf,
              "runs": runs, "median": med, "ours_over_trl_tokens_per_s": ratio}
    if a.objective == "dpo":
        result["ref_logps_max_abs_diff"] = ref_diff
    if a.out:
        write_json(a.out, result)
        dist.print0(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    dist.run(main)  # a user error (no trl, bad flag): one `error: ...` line, exit status 2
