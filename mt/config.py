"""Typed configuration: the paper's defaults (appendix B), named presets, a small override parser.

    python run_em.py --preset paper --policy DIR --rm DIR --prompts FILE --iters 2 --dpo.beta 0.05

Every paper hyperparameter is a default here; every methodological choice is a flag. Overrides are
type-checked against the defaults; unknown keys are rejected with the list of valid ones.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from mt.sandbox import SANDBOX_PRESET  # stdlib-only at import: no cycle


@dataclass
class SamplingConfig:
    """Policy sampling (appendix B, following SimPO): T=0.8, top-p 0.95, max length 2048."""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 2048
    greedy: bool = False
    slots: int = 64  # concurrent sequences in the KV cache
    max_prompt_tokens: int = 2048  # longer prompts are an error naming the prompt id
    check_every: int = 0  # decode steps between host checks for finished rows; 0 = 1 on CPU, 8 on GPU
    compile: bool = False  # torch.compile the decode step's forward (dynamic shapes; the first pass compiles)

    def outcome(self) -> dict:
        """The fields that decide what is sampled, for a stage's recorded params (run_em.py's manifest)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if f"sampling.{k}" not in SCHEDULING_ONLY}


# Settings that only schedule the work: tests/test_sampler.py shows the samples identical for any value, so a
# resumed run may change them (fewer slots after an out-of-memory, another GPU) without --force_config and
# without redoing finished stages.
SCHEDULING_ONLY = ("sampling.slots", "sampling.check_every")


@dataclass
class TrainConfig:
    """One optimisation stage (DPO or Bradley-Terry); the global batch = micro × accumulation × world."""
    lr: float = 7e-7
    batch_size: int = 128  # global, in pairs
    micro_batch_size: int = 2  # pairs per rank per forward
    epochs: int = 1
    warmup_ratio: float = 0.1  # cosine schedule after a linear warmup
    min_lr_ratio: float = 0.0
    max_length: int = 2048  # prompt + response tokens; longer pairs are dropped and counted
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    save_every: int = 50  # optimizer steps; these checkpoints are model selection's candidates
    dtype: str = "auto"  # auto = bf16 on GPU with fp32 master weights, fp32 on CPU
    activation_checkpointing: bool = False
    seed: int = 0


@dataclass
class DPOConfig(TrainConfig):
    """E-step, Eq. 4: DPO with π_{t-1} as the reference; β=0.01, batch 128, lr 7e-7 (appendix B)."""
    loss: str = "dpo"  # dpo | cdpo | ipo | simpo | hinge
    beta: float = 0.01
    label_smoothing: float = 0.0  # cdpo
    simpo_gamma: float = 0.5  # simpo target margin (γ; SimPO's γ/β ratio times β)


@dataclass
class RMConfig(TrainConfig):
    """M-step, Eq. 5: Bradley-Terry; batch 512, lr 2e-6, 1 epoch (appendix B)."""
    lr: float = 2e-6
    batch_size: int = 512
    micro_batch_size: int = 4
    margin: float = 0.0
    save_every: int = 0  # 0 = only the final model


@dataclass
class EMConfig:
    """Algorithm 1 and the two-stage stabilisation of Sec. 4.3."""
    n_samples: int = 5  # M responses per prompt of D_t
    d_ms_size: int = 2000  # |D_MS|, drawn before iteration 1
    rm_fraction: float = 1 / 3  # share of the remaining prompts in D_R (Sec. 5.1: three equal parts)
    pair_rule: str = "length_control"  # length_control (appendix B) | max_min
    keep_truncated: bool = False  # truncated / empty responses give no pair by default
    select: bool = True  # model selection (Eq. 6-7); False = take the final checkpoint
    tau: float = 0.6  # stop when the best win rate < τ
    filter: str = "lqf"  # lqf | hqs | dst | none (Sec. 4.3, appendix F)
    eps_stat: str = "var"  # var (appendix B) | std (Sec. 4.3)
    eps_mult: float = 2.0  # appendix B: 2 × the variance
    rm_data: str = "mixed"  # mixed | pc (policy comparison) | st (self-training), Sec. 5.3
    update_rm: bool = True  # False = iterative DPO with a fixed RM (baseline)
    rm_restart: bool = True  # appendix B: each RM iteration starts from r0
    rounds: int = 1  # Sec. 5.3: a second round restarts both models from the base models
    rm_heldout: float = 0.05  # share of D_R held out of RM training to report RM accuracy on pseudo-pairs


@dataclass
class Config:
    policy: str = ""  # π0: Hugging Face causal-LM directory
    rm: str = ""  # r0: Hugging Face sequence-classification directory (num_labels=1)
    prompts: str = ""  # the prompt set D (jsonl / json / parquet)
    out: str = "runs/mt"  # run directory
    iters: int = 2  # T
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    preset: str = "paper"
    em: EMConfig = field(default_factory=EMConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm_train: RMConfig = field(default_factory=RMConfig)


# ---- presets: a preset is a dict of overrides on top of the paper's defaults

PRESETS: dict[str, dict] = {
    "paper": {},
    # the embedded default main job (`python run_em.py`): the gold-reward sandbox at a scale for a CPU
    "sandbox": SANDBOX_PRESET,
    # tests: a handful of prompts, a few optimizer steps, short responses
    "tiny": {
        "iters": 2, "em.n_samples": 3, "em.d_ms_size": 4, "em.tau": 0.0,
        "sampling.max_new_tokens": 8, "sampling.slots": 8, "sampling.max_prompt_tokens": 64,
        "dpo.batch_size": 4, "dpo.micro_batch_size": 2, "dpo.lr": 1e-3, "dpo.save_every": 1,
        "dpo.max_length": 96, "dpo.beta": 0.1,
        "rm_train.batch_size": 4, "rm_train.micro_batch_size": 2, "rm_train.lr": 1e-3, "rm_train.max_length": 96,
    },
}


class ConfigError(ValueError):
    pass


def flat_keys(obj, prefix="") -> dict[str, typing.Any]:
    """{'dpo.beta': type, ...} for every leaf field."""
    out = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat_keys(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def _parse(key: str, raw, typ):
    """Parse a command-line string (or a JSON value) into the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw in (None, "none", "None", "null"):
            return None
        return _parse(key, raw, args[0])
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ is str:
            if not isinstance(raw, str):
                raise ValueError
            return raw
        if origin is tuple:
            parts = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            inner = typing.get_args(typ)
            if len(parts) != len(inner):
                raise ValueError
            return tuple(_parse(key, p, t) for p, t in zip(parts, inner))
    except ValueError:
        pass
    else:
        raise ConfigError(f"--{key}: unsupported field type {typ}")
    raise ConfigError(f"--{key}: expected {getattr(typ, '__name__', typ)}, got {raw!r}")


def set_key(cfg: Config, key: str, raw):
    keys = flat_keys(cfg)
    if key not in keys:
        raise ConfigError(f"unknown config key --{key}; valid keys: {', '.join('--' + k for k in keys)}")
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, _parse(key, raw, keys[key]))


CHOICES = {"em.pair_rule": ("length_control", "max_min"), "em.filter": ("lqf", "hqs", "dst", "none"),
           "em.eps_stat": ("var", "std"), "em.rm_data": ("mixed", "pc", "st"),
           "dpo.loss": ("dpo", "cdpo", "ipo", "simpo", "hinge"), "device": ("auto", "cpu", "cuda"),
           "dpo.dtype": ("auto", "fp32", "bf16"), "rm_train.dtype": ("auto", "fp32", "bf16")}


POSITIVE = ("dpo.lr", "dpo.beta", "rm_train.lr", "sampling.temperature", "em.eps_mult", "dpo.batch_size",
            "dpo.micro_batch_size", "rm_train.batch_size", "rm_train.micro_batch_size", "dpo.epochs",
            "rm_train.epochs", "sampling.slots", "sampling.max_prompt_tokens", "dpo.max_length", "rm_train.max_length")
NON_NEGATIVE = ("dpo.weight_decay", "rm_train.weight_decay", "dpo.grad_clip", "rm_train.grad_clip", "em.tau",
                "em.d_ms_size", "dpo.save_every", "rm_train.save_every", "sampling.top_k", "dpo.label_smoothing",
                "rm_train.margin", "em.rm_heldout", "dpo.simpo_gamma", "sampling.check_every")


def _get(cfg, key):
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> Config:
    """Reject inconsistent configs before any compute, naming the field and the allowed values."""
    for key, typ in flat_keys(cfg).items():
        v = _get(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{key}={v}: must be a finite number")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"--{key}={_get(cfg, key)}: must be > 0")
    for key in NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"--{key}={_get(cfg, key)}: must be >= 0")
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--preset {cfg.preset!r}: unknown; presets: {', '.join(PRESETS)}")
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={_get(cfg, key)!r}: must be one of {', '.join(allowed)}")
    if cfg.iters < 1:
        raise ConfigError(f"--iters={cfg.iters}: must be >= 1")
    if cfg.em.n_samples < 2:
        raise ConfigError(f"--em.n_samples={cfg.em.n_samples}: pairs need at least 2 responses per prompt")
    if not 0.0 <= cfg.em.rm_fraction < 1.0 or (cfg.em.update_rm and cfg.em.rm_fraction == 0):
        raise ConfigError(f"--em.rm_fraction={cfg.em.rm_fraction}: must be in (0, 1) (0 only with "
                          "--em.update_rm false, the fixed-RM baseline)")
    if cfg.em.rounds < 1:
        raise ConfigError(f"--em.rounds={cfg.em.rounds}: must be >= 1")
    for name in ("dpo", "rm_train"):
        t: TrainConfig = getattr(cfg, name)
        if t.batch_size % t.micro_batch_size:
            raise ConfigError(f"--{name}.batch_size={t.batch_size} is not a multiple of "
                              f"--{name}.micro_batch_size={t.micro_batch_size}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(f"--{name}.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    if cfg.sampling.max_new_tokens < 1 or not 0.0 < cfg.sampling.top_p <= 1.0:
        raise ConfigError("--sampling.max_new_tokens must be >= 1 and --sampling.top_p in (0, 1]")
    return cfg


def parse_args(argv: list[str], base: Config | None = None) -> Config:
    """`--preset NAME` first (paper defaults otherwise), then `--a.b value` overrides in order."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    pairs = []
    it = iter(argv)
    for tok in it:
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options are --key value (e.g. --dpo.beta 0.05)")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            val = next(it, None)
            if val is None:
                raise ConfigError(f"--{key}: missing value")
        pairs.append((key.replace("-", "_"), val))
    presets = [v for k, v in pairs if k == "preset"]
    if presets:
        name = presets[-1]
        if name not in PRESETS:
            raise ConfigError(f"--preset {name!r}: unknown; presets: {', '.join(PRESETS)}")
        cfg.preset = name
        for k, v in PRESETS[name].items():
            set_key(cfg, k, v)
    for k, v in pairs:
        if k != "preset":
            set_key(cfg, k, v)
    return validate(cfg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> Config:
    """Rebuild a Config from a saved config.json, rejecting unknown keys."""
    cfg = Config()

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
    return validate(cfg)


def save(cfg, path):
    from mt.data import write_json
    write_json(path, to_dict(cfg))


def diff(a: dict, b: dict, prefix="") -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: old -> new'."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and list(va) == list(vb or [])):
            out.append(f"{prefix}{k}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out
