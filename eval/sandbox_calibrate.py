"""Calibrate the sandbox's DPO learning rate on the oracle, never on a method.

    python eval/sandbox_calibrate.py --out runs/calibration  # writes eval/sandbox_calibration.json

The procedure, fixed before any Mutual-Taught-vs-baseline number was seen (README, "In what order
things were fixed"):

1. The calibration world: the general world of seed 1000 (not one of the report's seeds 0-14).
2. Its run split (run_em.py's partition with the sandbox preset: D_MS 400, D_1 1,300) and π0's
   M = 4 samples on D_1 (the E-step's own stream), scored by the GOLD reward; pairs by the
   E-step's rule (length control). These are the pairs an E-step with a perfect RM would use.
3. For each learning rate of the grid (β fixed at the sandbox's 0.1, every other DPO setting the
   sandbox's): one E-step of DPO from π0 on those pairs, a checkpoint every 50 steps; each
   checkpoint sampled --n times per D_MS prompt (one stream for all: common random numbers),
   judged by gold.
4. The chosen learning rate is the largest of the grid at which gold rises at every checkpoint
   50 steps apart (π0 < ckpt-50 < ckpt-100 < ckpt-150); the final checkpoint (a few steps after
   ckpt-150, at the schedule's end) is reported, not tested. mt/config.py SANDBOX_DPO_LR holds it.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

# `python eval/sandbox_calibrate.py`: make `mt` importable from the repo root
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_em  # noqa: E402
import train_policy  # noqa: E402
from mt import config as C  # noqa: E402
from mt import dist, flags, sandbox  # noqa: E402
from mt.flags import opt  # noqa: E402
from mt.data import read_samples, write_json, write_jsonl  # noqa: E402
from mt.manifest import lock_run_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "eval" / "sandbox_calibration.json"


@dataclass
class CalibrateConfig:
    seed: int = 1000  # the calibration world (kept apart from the report's seeds)
    world: str = opt("general", choices=tuple(sandbox.WORLDS))
    grid: str = "1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3"  # learning rates, comma-separated
    n: int = opt(4, above=0)  # samples per D_MS prompt for each checkpoint's gold
    every: int = opt(50, above=0)  # the checkpoints the rule tests: every `every` steps
    out: str = "runs/calibration"  # working directory (pairs, policies, samples)
    result: str = str(RESULT)  # the JSON the sandbox preset's lr is read from (committed)


def choose_lr(results: dict[float, list[float]]) -> float | None:
    """The largest lr whose gold sequence (π0, then each tested checkpoint) rises strictly at
    every step; None if none does."""
    ok = [lr for lr, g in results.items() if all(b > a for a, b in zip(g, g[1:]))]
    return max(ok) if ok else None


def calibrate(a: CalibrateConfig, world_overrides: dict | None = None,
              run_overrides: list[str] = ()) -> dict:
    world = sandbox.build_world(a.seed, world=a.world, **(world_overrides or {}))
    cfg = C.parse(["--preset", "sandbox", "--seed", str(a.seed), *run_overrides], C.Config())
    out = Path(a.out)
    run_em.write_splits(world.prompts_path, out / "splits", cfg.iters, cfg.em.rm_fraction,
                        cfg.em.d_ms_size, cfg.seed)
    d1, d_ms = out / "splits" / "D_1.jsonl", out / "splits" / "D_MS.jsonl"
    # the E-step's pairs with the gold reward as the judge
    train_policy.sample(world.policy_dir, d1, out / "samples.jsonl", cfg.sampling,
                        cfg.em.n_samples, cfg.seed, "iter1/e-step")
    write_jsonl(out / "scores.jsonl", sandbox.gold_scores(read_samples(out / "samples.jsonl")))
    stats = train_policy.pairs(out / "samples.jsonl", out / "scores.jsonl", out / "pairs.jsonl",
                               cfg.em.pair_rule, cfg.em.keep_truncated)
    train_policy.ref_logps(world.policy_dir, out / "pairs.jsonl", out / "ref_logps.jsonl",
                           **train_policy.reference_args(cfg.dpo))

    def gold_of(policy: Path, name: str) -> float:
        path = out / "gold" / f"{name}.samples.jsonl"
        train_policy.sample(policy, d_ms, path, cfg.sampling, a.n, cfg.seed, "calibrate")
        return sandbox.policy_gold(read_samples(path))

    base = gold_of(world.policy_dir, "pi0")
    rows, tested = {}, {}  # lr -> every checkpoint's numbers; lr -> the golds the rule tests
    for lr in [float(x) for x in a.grid.split(",") if x]:
        pol = out / f"lr{lr:g}" / "policy"
        dcfg = dataclasses.replace(cfg.dpo, lr=lr)
        train_policy.dpo(world.policy_dir, out / "pairs.jsonl", out / "ref_logps.jsonl", pol, dcfg)
        steps = train_policy.summary(pol)["steps"]
        points = [{"checkpoint": "pi0", "step": 0, "gold": base}]
        for k in train_policy.checkpoints(pol):
            step = steps if k == "final" else int(k.split("-")[1])
            points.append({"checkpoint": k, "step": step,
                           "gold": gold_of(pol / k, f"lr{lr:g}-{k}")})
        rows[lr] = points
        tested[lr] = [p["gold"] for p in points
                      if p["checkpoint"] != "final" and p["step"] % a.every == 0]
    chosen = choose_lr(tested)
    return {"procedure": __doc__.split("\n\n", 2)[2].strip(), "world": a.world, "seed": a.seed,
            "world_key": world.root.name, "beta": cfg.dpo.beta, "pairs": stats.get("pairs"),
            "dpo": {k: getattr(cfg.dpo, k) for k in ("batch_size", "save_every", "beta", "loss")},
            "n_per_prompt": a.n, "d_ms": cfg.em.d_ms_size,
            "grid": {f"{lr:g}": rows[lr] for lr in rows},
            "rises_at_every_checkpoint": {f"{lr:g}": choose_lr({lr: g}) == lr
                                          for lr, g in tested.items()},
            "chosen_lr": chosen}


def main(argv=None):
    a = flags.parse(sys.argv[1:] if argv is None else argv, CalibrateConfig(),
                "python eval/sandbox_calibrate.py", __doc__)
    lock_run_dir(Path(a.out))  # a second calibration into this folder is refused, naming this one
    result = calibrate(a)
    write_json(a.result, result)
    print("| lr | " + " | ".join(f"{p['checkpoint']} ({p['step']})"
                                for p in next(iter(result["grid"].values()))) + " | rises |")
    for lr, points in result["grid"].items():
        print(f"| {lr} | " + " | ".join(f"{p['gold']:.4f}" for p in points)
              + f" | {result['rises_at_every_checkpoint'][lr]} |")
    print(f"chosen lr: {result['chosen_lr']} -> {a.result}")


if __name__ == "__main__":
    dist.run(main)
