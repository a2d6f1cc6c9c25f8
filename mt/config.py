"""Typed configuration: the paper's defaults (appendix B), named presets, the checks across
fields, and a run's saved config.json.

    python run_em.py --preset paper --policy DIR --rm DIR --prompts FILE --iters 2 --dpo.beta 0.05

Every paper hyperparameter is a default here; every methodological choice is a flag, in the one
flag language of mt/flags.py (`--section.key value`, `--help`). Allowed values and ranges are
declared beside their field with `opt(...)`; the checks that span fields are `validate`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

from mt import flags
from mt.data import write_json
from mt.flags import ConfigError, check_fields, opt, set_key
from mt.losses import PREFERENCE_LOSSES


@dataclass
class SamplingConfig:
    # one physical string for the docstring: its first line is this section's --help heading
    ("Policy sampling (appendix B, following SimPO): T=0.8, top-p 0.95; at most 4,096 new "
     "tokens.")
    temperature: float = opt(0.8, min=0)  # > 0, or 0 with --sampling.greedy
    top_p: float = 0.95  # nucleus mass, in (0, 1]; 1 = off
    top_k: int = opt(0, min=0)  # 0 = off
    # the paper states no sampling cap (2,048 is its *training* length); SimPO's on-policy sampler,
    # which appendix B follows, allows 4,096 new tokens. Each stage reports its truncation rate.
    max_new_tokens: int = opt(4096, min=1)
    greedy: bool = False  # argmax decoding (ignores temperature, top-p, top-k)
    slots: int = opt(64, above=0, scheduling=True)  # concurrent sequences in the KV cache
    max_prompt_tokens: int = opt(2048, above=0)  # longer prompts are an error naming the prompt id
    # decode steps between host checks for finished rows; 0 = 1 on CPU, 8 on GPU
    check_every: int = opt(0, min=0, scheduling=True)
    # torch.compile the decode step (static shapes, a graph per bucket; CUDA graphs on GPU)
    compile: bool = False
    # the KV cache (mt/sampler.py): "paged", rows take blocks of 128 positions as they grow and read
    # only their own, through FlexAttention (fused when compiled, on CUDA); "dense", every slot keeps
    # room for its longest possible row, read through SDPA (faster on CPU, where FlexAttention runs
    # as an uncompiled reference); auto = paged on CUDA, dense elsewhere. The same tokens either way.
    kv_cache: str = opt("auto", choices=("auto", "paged", "dense"), scheduling=True)
    # blocks in the paged cache's pool; 0 = every slot's longest row, on a GPU at most what its free
    # memory holds. When rows outgrow it, the row started last waits and restarts (the same tokens).
    kv_blocks: int = opt(0, min=0, scheduling=True)


@dataclass
class TrainConfig:
    """One optimisation stage (DPO or Bradley-Terry);
    the global batch = micro × accumulation × world."""
    lr: float = opt(7e-7, above=0)
    batch_size: int = opt(128, above=0)  # global, in pairs
    micro_batch_size: int = opt(2, above=0)  # pairs per rank per forward
    epochs: int = opt(1, above=0)
    warmup_ratio: float = 0.1  # cosine schedule after a linear warmup; in [0, 1)
    min_lr_ratio: float = 0.0
    # prompt + response tokens; longer pairs are dropped and counted
    max_length: int = opt(2048, above=0)
    weight_decay: float = opt(0.0, min=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = opt(1.0, min=0)
    # optimizer steps; these checkpoints are model selection's candidates
    save_every: int = opt(50, min=0)
    # auto = bf16 on GPU (fp32 master), fp32 on CPU; fp64 for the exactness tests
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16", "fp64"))
    # recompute each block's activations in the backward (results unchanged); the paper presets
    # turn it on, as every 8B DPO / RM recipe does
    activation_checkpointing: bool = opt(False, scheduling=True)
    # packed micro-batches (mt/packing.py): no padding, micro-batches by tokens; false = padded
    # rows, the reference layout (results equal within float tolerance either way)
    packing: bool = opt(True, scheduling=True)
    # with packing, a pair's prompt once: chosen and rejected attend to the same prompt keys
    share_prompt: bool = opt(True, scheduling=True)
    # tokens per packed micro-batch per rank; 0 = micro_batch_size × the largest example's tokens
    micro_batch_tokens: int = opt(0, min=0, scheduling=True)
    seed: int = 0


@dataclass
class DPOConfig(TrainConfig):
    # one physical string for the docstring: its first line is this section's --help heading
    ("E-step, Eq. 4: DPO with π_{t-1} as the reference; β=0.01, batch 128, lr 7e-7 "
     "(appendix B).")
    loss: str = opt("dpo", choices=PREFERENCE_LOSSES)  # mt/losses.py LOSSES
    beta: float = opt(0.01, above=0)
    label_smoothing: float = opt(0.0, min=0)  # cdpo
    # SimPO's γ: the target reward margin inside its loss, -log σ(β·avg_w − β·avg_l − γ) (simpo
    # only); SimPO's Llama-3-8B-Instruct recipe: γ/β = 0.55 at β = 2.5, so γ = 1.375
    target_margin: float = opt(1.375, min=0)


@dataclass
class RMConfig(TrainConfig):
    """M-step, Eq. 5: Bradley-Terry; batch 512, lr 2e-6, 1 epoch (appendix B)."""
    lr: float = opt(2e-6, above=0)
    batch_size: int = opt(512, above=0)
    micro_batch_size: int = opt(4, above=0)
    margin: float = opt(0.0, min=0)
    save_every: int = opt(0, min=0)  # 0 = only the final model


@dataclass
class EMConfig:
    """Algorithm 1 and the two-stage stabilisation of Sec. 4.3."""
    n_samples: int = 5  # M responses per prompt of D_t
    d_ms_size: int = opt(2000, min=0)  # |D_MS|, drawn before iteration 1
    # share of the remaining prompts in D_R (Sec. 5.1: three equal parts)
    rm_fraction: float = 1 / 3
    # appendix B | max/min
    pair_rule: str = opt("length_control", choices=("length_control", "max_min"))
    keep_truncated: bool = False  # truncated / empty responses give no pair by default
    select: bool = True  # model selection (Eq. 6-7); False = take the final checkpoint
    tau: float = opt(0.6, min=0)  # stop when the best win rate < τ
    filter: str = opt("lqf", choices=("lqf", "hqs", "dst", "none"))  # Sec. 4.3, appendix F
    # ε_t = eps_mult × σ of r_{t-1}(y_{t-1}) (Sec. 4.3: σ, in the units of Δr);
    # var = appendix B's literal wording
    eps_stat: str = opt("std", choices=("std", "var"))
    eps_mult: float = opt(2.0, above=0)  # appendix B: searched 1, 2, 3; used 2
    # policy comparison, self-training (Sec. 5.3)
    rm_data: str = opt("mixed", choices=("mixed", "pc", "st"))
    update_rm: bool = True  # False = iterative DPO with a fixed RM (baseline)
    rm_restart: bool = True  # appendix B: each RM iteration starts from r0
    rounds: int = 1  # Sec. 5.3: a second round restarts both models from the base models
    # share of D_R held out of RM training, to report RM accuracy on pseudo-pairs it never saw; the
    # paper trains on all of D_R (0), so this is an opt-in diagnostic (the sandbox keeps 0.05)
    rm_heldout: float = opt(0.0, min=0)
    # all | selected: delete the candidates selection did not choose once its choice is recorded
    # (8B checkpoints are 16 GB each); resuming is unaffected
    keep_checkpoints: str = opt("all", choices=("all", "selected"), scheduling=True)

    # ---- readings the paper leaves open (issue 29): each flag names its reading; every default is
    # the reading all committed results ran with, so a default run's artifacts are unchanged

    # §4.3: "If no candidate ... (max_k w_t^k < τ), the iteration halts, and the previous model is
    # preserved"; appendix B: "The iteration is terminated if the highest win-rate w_t^k is less
    # than 60%". end: the τ stop ends the run (later iterations and rounds never start); skip: only
    # this iteration halts, and π_{t-1}, r_{t-1} go on to D_{t+1}. The text fits both; end is the
    # default: appendix B's "terminated" reads as the procedure's end (a convergence test, as in
    # EM), while nothing in Alg. 1 says what a later E-step would start from after a stop
    on_stop: str = opt("end", choices=("end", "skip"))
    # Eq. 6: w_t^k compares π_t^k "against π_{t-1} from the previous iteration"; appendix B: "the
    # highest win-rate relative to the initial policy of the current iteration". They differ only in
    # a later round's first iteration (Sec. 5.3), whose DPO starts from π0 while its data come from
    # the previous round's final policy. prev_round: against that policy (Eq. 6's π_{t-1}, the
    # default: the main text's equation is the specification, and it is the model a τ stop keeps);
    # pi0: against the policy DPO started from (appendix B's wording)
    round_ref: str = opt("prev_round", choices=("prev_round", "pi0"))
    # Sec. 5.3: "The self-training data comprises preference data used in the first iteration of
    # policy model optimization, with labels derived from the base reward model". all: the E-step
    # pairs of D_1..D_t built so far in this round, those labelled by r_{t-1} included (DESIGN.md
    # §1; the default, as every committed result ran); first: only the run's first iteration's
    # pairs, labelled by r0 (§5.3's definition read literally: the same ST set in every M-step)
    st_pairs: str = opt("all", choices=("all", "first"))
    # Eq. 6: I(y_t^k ≻ y_{t-1}) = 1 if r_{t-1}(y_t^k) > r_{t-1}(y_{t-1}), "0 otherwise": a tie is no
    # win (0, the paper's rule and the default). 0.5 counts a tie as half a win: an analysis option
    # (how much of a τ decision ties make), not the paper's rule
    tie_credit: float = opt(0.0, choices=(0.0, 0.5))


@dataclass
class SandboxConfig:
    "The gold-reward sandbox (mt/sandbox.py): used when no --policy/--rm/--prompts are given."
    # general: r0 trained on a mixture of generators; exploit: r0 trained on π0's samples only
    world: str = opt("general", choices=("general", "exploit"))
    # per iteration: gold, drift and the RMs' gold agreement (mt/gold.py; iter*/gold.json)
    diagnostics: bool = opt(True, scheduling=True)
    # a positive control, not the paper's method: the M-step's pseudo-pairs (the same (y_t, y_{t-1})
    # on D_R) labelled by the world's gold reward instead of r_{t-1} -- chosen = the higher gold, a
    # gold tie dropped, no ε_t filter (it removes labels r_{t-1} likely got wrong; gold's are
    # right). The E-step pairs of --em.rm_data keep the RM's labels. Sandbox worlds only
    oracle_pseudo_labels: bool = False


@dataclass
class LogConfig:
    """Experiment tracking (mt/track.py): TensorBoard, wandb; rank 0 only, off by default."""
    # TensorBoard: events under DIR/<--log.name> (`pip install tensorboard`); "" = off
    tensorboard: str = opt("", scheduling=True)
    # a Weights & Biases project (`pip install wandb`; WANDB_MODE=offline works); "" = off
    wandb: str = opt("", scheduling=True)
    name: str = opt("", scheduling=True)  # the run's name there; "" = the --out directory's name


@dataclass
class DistConfig:
    """torchrun's process group and FSDP2's device mesh (DESIGN.md §5)."""
    # collective timeout in minutes (0 = torch's default); raise it if rank 0 alone loads 8B weights
    timeout_min: float = opt(0.0, min=0, scheduling=True)
    # HSDP: shard inside groups of this many ranks (a node's GPUs), replicate across; 0 = plain FSDP
    shard_size: int = opt(0, min=0, scheduling=True)


@dataclass
class Config:
    """The experiment: Algorithm 1 on π0, r0 and the prompt set D."""
    policy: str = ""  # π0: Hugging Face causal-LM directory
    rm: str = ""  # r0: Hugging Face sequence-classification directory (num_labels=1)
    prompts: str = ""  # the prompt set D (jsonl / json / parquet)
    # run directory (where, not what: a moved run stays valid)
    out: str = opt("runs/mt", scheduling=True)
    iters: int = 2  # T
    seed: int = 0
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    preset: str = "paper"  # applied first, whatever its place on the command line; see PRESETS
    # accept a changed config on resume: redo the stages it affects (not an experiment setting)
    force_config: bool = opt(False, scheduling=True)
    em: EMConfig = field(default_factory=EMConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm_train: RMConfig = field(default_factory=RMConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class StageConfig(Config):
    """One stage on explicit files (train_policy.py, train_rm.py, `python run_em.py STAGE`)."""
    out: str = ""  # the stage's output file or directory
    # ready preference pairs (train_policy.py: offline DPO; train_rm.py: comma-separated files)
    pairs: str = ""
    model: str = ""  # sample: the policy directory to sample from
    samples: str = ""  # score, pairs: a samples.jsonl
    scores: str = ""  # pairs: the scores.jsonl of those samples
    prev: str = ""  # select, pseudo_pairs: π_{t-1}'s directory
    new: str = ""  # pseudo_pairs: π_t's directory
    candidates: str = ""  # select: the directory holding ckpt-*/ and final/
    pseudo_pairs: str = ""  # filter: a pseudo_pairs.jsonl to re-filter
    init: str = ""  # rm: the RM (or causal LM, given a fresh score head) to start from
    # names the random stream (run_em.py uses e.g. iter1/e-step); default: the stage name
    stream: str = ""


# ---- presets: a preset is a dict of overrides on top of the paper's defaults

# the sandbox's DPO learning rate: the largest of eval/sandbox_calibrate.py's grid at which DPO on
# gold-labelled pairs improves gold at every checkpoint (eval/sandbox_calibration.json)
SANDBOX_DPO_LR = 1e-5

# The sandbox (mt/sandbox.py) scales the paper to a CPU:
# the embedded default main job `python run_em.py`.
SANDBOX: dict = {
    "iters": 2,  # T = 2, as in the paper's main results
    "em.n_samples": 4,  # M
    # |D_MS| of the world's 4,300 prompts; the rest: D_R, D_1, D_2 = 1,300 each (Sec. 5.1)
    "em.d_ms_size": 400,
    "em.tau": 0.6,  # the paper's τ, with Eq. 6 as written (ties are rare: answers vary in form)
    "em.rm_heldout": 0.05,  # a diagnostic the sandbox reports
    "sampling.max_new_tokens": 24, "sampling.slots": 256, "sampling.max_prompt_tokens": 64,
    # the paper's E-step shape: ~160 steps of 8 pairs per iteration, checkpoints every 50
    # (appendix B: every 50 steps), so three candidates and the final one. The lr is the oracle
    # calibration's (eval/sandbox_calibrate.py, eval/sandbox_calibration.json), β fixed at 0.1.
    "dpo.batch_size": 8, "dpo.micro_batch_size": 8, "dpo.lr": SANDBOX_DPO_LR, "dpo.beta": 0.1,
    "dpo.save_every": 50, "dpo.max_length": 64,
    "rm_train.batch_size": 32, "rm_train.micro_batch_size": 32, "rm_train.lr": 3e-4,
    "rm_train.epochs": 2, "rm_train.max_length": 64,
}

# The baselines and ablations, as differences from Mutual-Taught, with their sources. Each gives a
# `paper-NAME` preset (on the paper's defaults) and a `sandbox-NAME` preset (on SANDBOX, with the
# one calibrated DPO learning rate for every method: see _sandbox_variant).
# no M-step: every portion goes to the policy
_FIXED_RM = {"em.update_rm": False, "em.rm_fraction": 0.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    # Table 1, appendix A/B: iterative DPO with the fixed r0 over all three portions, three
    # iterations, lr lowered to 5e-7 ("performance degradation in the final iteration with a large
    # learning rate")
    "iterative-dpo": ("Table 1 DPO Iter1-3",
                      {**_FIXED_RM, "iters": 3, "em.select": False, "dpo.lr": 5e-7}),
    # Table 1 offline baselines (appendix A/B): one pass on pairs from π0 scored by r0, "the same
    # sampling and training parameters as Mutual-Taught"; SimPO with SimPO's own
    # Llama-3-8B-Instruct recipe
    "offline-dpo": ("Table 1 DPO (offline)", {**_FIXED_RM, "iters": 1, "em.select": False}),
    "offline-ipo": ("Table 1 IPO",
                    {**_FIXED_RM, "iters": 1, "em.select": False, "dpo.loss": "ipo"}),
    "offline-simpo": ("Table 1 SimPO", {**_FIXED_RM, "iters": 1, "em.select": False,
                                        "dpo.loss": "simpo", "dpo.beta": 2.5,
                                        "dpo.target_margin": 2.5 * 0.55, "dpo.lr": 1e-6}),
    # Fig. 6 (appendix E): the two-stage stabilisation
    "no-select": ("Fig. 6 w/o MS", {"em.select": False}),
    "no-filter": ("Fig. 6 w/o DF", {"em.filter": "none"}),
    "no-select-no-filter": ("Fig. 6 w/o both", {"em.select": False, "em.filter": "none"}),
    # Fig. 4 (Sec. 5.3): the RM's training data
    "pc": ("Fig. 4 PC only", {"em.rm_data": "pc"}),
    "st": ("Fig. 4 ST only", {"em.rm_data": "st"}),
    # Fig. 7 (appendix F): filtering strategies
    "hqs": ("Fig. 7 HQS", {"em.filter": "hqs"}),
    "dst": ("Fig. 7 DST", {"em.filter": "dst"}),
    # Fig. 5 (Sec. 5.3): a second round from the base models
    "rounds2": ("Fig. 5 round 2", {"em.rounds": 2}),
}


# Sandbox-only variants (positive controls, not in the paper): a `sandbox-NAME` preset each
SANDBOX_VARIANTS: dict[str, tuple[str, dict]] = {
    # issue 29: no-select with the M-step's pseudo-pairs labelled by gold, what any M-step could
    # deliver on these pairs; it differs from no-select only in those labels
    "no-select-oracle": ("positive control: Fig. 6 w/o MS, gold pseudo-labels",
                         {"em.select": False, "sandbox.oracle_pseudo_labels": True}),
}


def _sandbox_variant(diff: dict) -> dict:
    """A variant on the sandbox: its own settings but the oracle-calibrated learning rate, frozen
    for every method (the paper's per-baseline rates stay in its paper-NAME preset)."""
    return {k: v for k, v in diff.items() if k != "dpo.lr"}


# activation checkpointing: what an 8B policy / RM needs on 8 GPUs (no effect on any result); a
# collective timeout that outlasts rank 0 reading or writing 8B weights while the others wait in a
# collective (torch's default, 10 minutes, does not); 128 rows decoding at once, which the paged KV
# cache holds at 8B on an 80 GB card at realistic lengths (mt/plan.py paged_rows; never a result)
PAPER_GPU = {"dpo.activation_checkpointing": True, "rm_train.activation_checkpointing": True,
             "dist.timeout_min": 60.0, "sampling.slots": 128}

PRESETS: dict[str, dict] = {
    # Mutual-Taught as the paper runs it: every default of this file,
    # each with its source beside it, and the memory setting of an 8B run
    "paper": PAPER_GPU,
    "sandbox": SANDBOX,
    **{f"paper-{k}": {**PAPER_GPU, **diff} for k, (_, diff) in VARIANTS.items()},
    **{f"sandbox-{k}": {**SANDBOX, **_sandbox_variant(diff)}
       for k, (_, diff) in {**VARIANTS, **SANDBOX_VARIANTS}.items()},
    # tests: a handful of prompts, a few optimizer steps, short responses
    "tiny": {
        "iters": 2, "em.n_samples": 3, "em.d_ms_size": 4, "em.tau": 0.0,
        "sampling.max_new_tokens": 8, "sampling.slots": 8, "sampling.max_prompt_tokens": 64,
        "dpo.batch_size": 4, "dpo.micro_batch_size": 2, "dpo.lr": 1e-3, "dpo.save_every": 1,
        "dpo.max_length": 96, "dpo.beta": 0.1,
        "rm_train.batch_size": 4, "rm_train.micro_batch_size": 2, "rm_train.lr": 1e-3,
        "rm_train.max_length": 96,
    },
}


# ---- checks across fields, and the experiment's flags


def validate(cfg: Config) -> Config:
    """Reject inconsistent experiment configs before any compute, naming the field
    and the allowed values."""
    check_fields(cfg)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r}: unknown; presets: {', '.join(PRESETS)}")
    if cfg.iters < 1:
        raise ConfigError(f"--iters={cfg.iters}: must be >= 1")
    if cfg.em.n_samples < 2:
        raise ConfigError(f"--em.n_samples={cfg.em.n_samples}: pairs need at least 2 responses "
                          "per prompt")
    if not 0.0 <= cfg.em.rm_fraction < 1.0 or (cfg.em.update_rm and cfg.em.rm_fraction == 0):
        raise ConfigError(f"--em.rm_fraction={cfg.em.rm_fraction}: must be in (0, 1) (0 only with "
                          "--em.update_rm false, the fixed-RM baseline)")
    if cfg.em.tau > 1:
        raise ConfigError(f"--em.tau={cfg.em.tau}: a win rate threshold, must be in [0, 1]. Fix: "
                          "pass a share, e.g. --em.tau 0.6")
    if cfg.sandbox.oracle_pseudo_labels and not cfg.em.update_rm:
        raise ConfigError("--sandbox.oracle_pseudo_labels true labels the M-step's pseudo-pairs, "
                          "but --em.update_rm false runs no M-step. Fix: drop one of the two")
    if cfg.em.rounds < 1:
        raise ConfigError(f"--em.rounds={cfg.em.rounds}: must be >= 1")
    for name in ("dpo", "rm_train"):
        t: TrainConfig = getattr(cfg, name)
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(f"--{name}.batch_size={t.batch_size} is not a multiple of "
                              f"--{name}.micro_batch_size={t.micro_batch_size}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(f"--{name}.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    if cfg.dpo.label_smoothing and cfg.dpo.loss != "cdpo":
        raise ConfigError(f"--dpo.label_smoothing={cfg.dpo.label_smoothing} applies only to "
                          "--dpo.loss cdpo")
    if cfg.dpo.loss == "cdpo" and not 0 < cfg.dpo.label_smoothing < 0.5:
        raise ConfigError("--dpo.loss cdpo needs 0 < --dpo.label_smoothing < 0.5")
    check_sampling(cfg.sampling)
    return cfg


def check_sampling(s: SamplingConfig) -> SamplingConfig:
    """The sampling checks that span fields (every command that samples runs them)."""
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"--sampling.top_p={s.top_p}: must be in (0, 1]")
    if s.temperature <= 0 and not s.greedy:
        raise ConfigError(f"--sampling.temperature={s.temperature}: must be > 0 (or pass "
                          "--sampling.greedy)")
    return s


def parse(argv: list[str], base, prog: str | None = None, doc: str = ""):
    """`flags.parse` with the experiment's presets (`--preset NAME`, when `base` has the field),
    and `validate` for an experiment Config: run_em.py and its stages, train_policy.py,
    train_rm.py."""
    return flags.parse(argv, base, prog, doc, PRESETS,
                       validate if isinstance(base, Config) else check_fields)


# ---- saved configs


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config", base=None):
    """Rebuild a config from a saved config.json, rejecting unknown keys."""
    cfg = copy.deepcopy(base) if base is not None else Config()

    def walk(prefix, dd):
        for k, v in dd.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                try:
                    set_key(cfg, f"{prefix}{k}", v)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None

    walk("", d)
    return validate(cfg) if isinstance(cfg, Config) else check_fields(cfg)


def save(cfg, path):
    write_json(path, to_dict(cfg))


def diff(a: dict, b: dict, prefix="") -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: old -> new'."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        # a section one side lacks (added since a run began) is compared key by key, so that a
        # resume can skip its scheduling-only keys
        va = {} if k not in a and isinstance(vb, dict) else va
        vb = {} if k not in b and isinstance(va, dict) else vb
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and list(va) == list(vb or [])):
            out.append(f"{prefix}{k}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out
