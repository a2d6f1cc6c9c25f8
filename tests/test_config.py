"""mt/config.py and mt/flags.py: the paper's appendix-B defaults, presets, the typed override parser and its errors,
and saved configs that read back identically."""

import dataclasses
import json

import pytest

from mt.config import PRESETS, Config, diff, from_dict, parse, save, to_dict
from mt.flags import ConfigError, flat_keys


def parse_args(argv):
    """The experiment's flags onto the paper's defaults, as `python run_em.py` parses them."""
    return parse(argv, Config())


# The paper's numbers, each with where it is stated: the `paper` preset must be exactly these.
PAPER = {
    "iters": (2, "appendix B: two iterations"),
    "em.n_samples": (5, "appendix B: M = 5"),
    "sampling.temperature": (0.8, "appendix B, following SimPO"),
    "sampling.top_p": (0.95, "appendix B, following SimPO"),
    "sampling.max_new_tokens": (4096, "not in the paper; SimPO's on-policy sampler, which appendix B follows"),
    "dpo.loss": ("dpo", "Eq. 4"),
    "dpo.beta": (0.01, "appendix B"),
    "dpo.batch_size": (128, "appendix B"),
    "dpo.lr": (7e-7, "appendix B"),
    "dpo.max_length": (2048, "appendix B"),
    "dpo.save_every": (50, "appendix B: a checkpoint every 50 steps"),
    "dpo.epochs": (1, "appendix B: one epoch"),
    "dpo.warmup_ratio": (0.1, "appendix B: cosine, warmup 0.1"),
    "em.d_ms_size": (2000, "appendix B: 2,000 prompts"),
    "em.tau": (0.6, "appendix B: 60%"),
    "em.select": (True, "Sec. 4.3 model selection"),
    "em.filter": ("lqf", "Sec. 4.3: drop Δr <= -ε_t"),
    "em.eps_stat": ("std", "Sec. 4.3: ε_t = sqrt(Var)"),
    "em.eps_mult": (2.0, "appendix B: twice"),
    "em.rm_data": ("mixed", "Sec. 5.1 / 5.3"),
    "em.rm_restart": (True, "appendix B: each RM iteration starts from the base RM"),
    "em.pair_rule": ("length_control", "appendix B: length control"),
    "em.rm_fraction": (1 / 3, "Sec. 5.1: three subsets"),
    "em.rm_heldout": (0.0, "Sec. 5.1: the RM trains on all of its data"),
    "em.update_rm": (True, "Alg. 1 line 8"),
    "em.rounds": (1, "Sec. 5.3: a second round is an additional experiment"),
    "rm_train.batch_size": (512, "appendix B"),
    "rm_train.lr": (2e-6, "appendix B"),
    "rm_train.max_length": (2048, "appendix B"),
    "rm_train.epochs": (1, "appendix B: one epoch"),
    "rm_train.warmup_ratio": (0.1, "appendix B"),
}


def test_paper_preset_is_the_paper():
    for cfg in (Config(), parse_args(["--preset", "paper"])):
        assert cfg.preset == "paper"
        for key, (want, source) in PAPER.items():
            assert _get(dataclasses.asdict(cfg), key) == want, (key, source)


def test_every_variant_preset_resolves_to_its_documented_values():
    """paper-NAME = the paper's defaults + VARIANTS[NAME]; sandbox-NAME = the sandbox + the same
    differences except the learning rate: the oracle-calibrated one for every method (mt/config.py
    SANDBOX_DPO_LR, eval/sandbox_calibration.json's chosen_lr)."""
    import json
    from pathlib import Path
    calibration = json.loads((Path(__file__).parent.parent / "eval" / "sandbox_calibration.json").read_text())
    from mt.config import PAPER_GPU, SANDBOX, VARIANTS
    paper = dataclasses.asdict(parse_args(["--preset", "paper"]))
    assert all(_get(paper, k) == v for k, v in PAPER_GPU.items())  # activation checkpointing on
    for name, (figure, diff) in VARIANTS.items():
        p, sb = dataclasses.asdict(parse_args(["--preset", f"paper-{name}"])), dataclasses.asdict(
            parse_args(["--preset", f"sandbox-{name}"]))
        for key in flat_keys(Config()):
            if key == "preset":
                continue
            assert _get(p, key) == diff.get(key, _get(paper, key)), (name, key)
            want = calibration["chosen_lr"] if key == "dpo.lr" else diff.get(
                key, SANDBOX.get(key, _get(dataclasses.asdict(Config()), key)))
            assert _get(sb, key) == pytest.approx(want), (name, key)
    # the baselines as appendix A / B and the SimPO recipe state them
    it = parse_args(["--preset", "paper-iterative-dpo"])
    assert (it.iters, it.em.update_rm, it.em.rm_fraction, it.em.select, it.dpo.lr) == (3, False, 0.0, False, 5e-7)
    simpo = parse_args(["--preset", "paper-offline-simpo"])
    assert (simpo.dpo.loss, simpo.dpo.beta, simpo.dpo.target_margin, simpo.dpo.lr) == ("simpo", 2.5, 1.375, 1e-6)
    assert parse_args(["--preset", "paper-offline-ipo"]).dpo.beta == 0.01  # "the same training parameters"
    assert parse_args(["--preset", "sandbox-offline-dpo", "--dpo.beta", "0.3"]).dpo.beta == 0.3  # flags win


def test_tiny_preset():
    cfg = parse_args(["--preset", "tiny"])
    assert cfg.preset == "tiny"
    for key, value in PRESETS["tiny"].items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj == value, key
    assert cfg.dpo.batch_size % cfg.dpo.micro_batch_size == 0
    # paper values the preset does not touch are kept
    assert cfg.em.filter == "lqf" and cfg.sampling.top_p == 0.95


def test_overrides_are_typed():
    cfg = parse_args(["--dpo.beta", "0.05", "--iters", "3", "--em.filter", "hqs", "--rm_train.lr=1e-5",
                      "--em.select", "false", "--em.update-rm=0", "--sampling.greedy", "yes",
                      "--dpo.adam_betas", "0.9,0.95", "--policy", "/models/pi0"])
    assert cfg.dpo.beta == 0.05 and type(cfg.dpo.beta) is float
    assert cfg.iters == 3 and type(cfg.iters) is int
    assert cfg.em.filter == "hqs" and cfg.rm_train.lr == 1e-5
    assert cfg.em.select is False and cfg.em.update_rm is False and cfg.sampling.greedy is True
    assert cfg.dpo.adam_betas == (0.9, 0.95) and cfg.policy == "/models/pi0"
    assert Config().dpo.beta == 0.01  # defaults are not shared mutable state


def test_override_beats_preset_in_any_order():
    assert parse_args(["--dpo.beta", "0.5", "--preset", "tiny"]).dpo.beta == 0.5
    assert parse_args(["--preset", "tiny", "--dpo.beta", "0.5"]).dpo.beta == 0.5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_args(["--dpo.betta", "0.1"])
    msg = str(e.value)
    assert msg.startswith("unknown config key --dpo.betta; valid keys: ")
    for key in ("--dpo.beta", "--iters", "--em.filter", "--sampling.top_p", "--rm_train.lr"):
        assert key in msg
    assert set(msg.split("valid keys: ")[1].split(", ")) == {"--" + k for k in flat_keys(Config())}


@pytest.mark.parametrize("argv, message", [
    (["--iters", "two"], "--iters: expected int, got 'two'"),
    (["--iters", "2.5"], "--iters: expected int, got '2.5'"),
    (["--dpo.beta", "small"], "--dpo.beta: expected float, got 'small'"),
    (["--em.select", "maybe"], "--em.select: expected bool, got 'maybe'"),
    (["--dpo.adam_betas", "0.9"], "--dpo.adam_betas: expected tuple"),
    (["--em.filter", "best"], "--em.filter='best': must be one of lqf, hqs, dst, none"),
    (["--dpo.loss", "kto"], "--dpo.loss='kto': must be one of dpo, cdpo, ipo, simpo, hinge"),
    (["--em.rm_data", "all"], "--em.rm_data='all': must be one of mixed, pc, st"),
    (["--preset", "huge"], "--preset 'huge': unknown; presets: paper, sandbox, paper-iterative-dpo"),
    (["--iters"], "--iters: missing value"),
    (["iters", "2"], "unexpected argument 'iters'"),
    (["--iters", "0"], "--iters=0: must be >= 1"),
    (["--em.n_samples", "1"], "--em.n_samples=1: pairs need at least 2 responses"),
    (["--dpo.batch_size", "10", "--dpo.micro_batch_size", "4"],
     "--dpo.batch_size=10 is not a multiple of --dpo.micro_batch_size=4"),
])
def test_bad_overrides_rejected(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_round_trip_through_json(tmp_path):
    cfg = parse_args(["--preset", "tiny", "--dpo.beta", "0.2", "--em.filter", "dst", "--dpo.adam_betas", "0.8,0.9"])
    d = to_dict(cfg)
    assert from_dict(d) == cfg
    save(cfg, tmp_path / "config.json")
    loaded = json.loads((tmp_path / "config.json").read_text())  # tuples come back as lists
    assert from_dict(loaded) == cfg and diff(d, loaded) == []


def test_from_dict_rejects_bad_files():
    d = to_dict(Config())
    d["em"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"^run/config.json: unknown config key --em.bogus; valid keys: "):
        from_dict(d, source="run/config.json")
    d = to_dict(Config())
    d["iters"] = True
    with pytest.raises(ConfigError, match=r"^run/config.json: --iters: expected int, got True"):
        from_dict(d, source="run/config.json")
    d = to_dict(Config())
    d["em"]["filter"] = "nope"
    with pytest.raises(ConfigError, match="--em.filter='nope': must be one of"):
        from_dict(d)


def test_diff_lists_changed_keys():
    paper, tiny = to_dict(Config()), to_dict(parse_args(["--preset", "tiny"]))
    changes = diff(paper, tiny)
    assert "dpo.beta: 0.01 -> 0.1" in changes and 'preset: "paper" -> "tiny"' in changes
    assert "em.n_samples: 5 -> 3" in changes
    assert len(changes) == len(PRESETS["tiny"]) + 1 - sum(  # every preset key that changes a value, plus preset
        1 for k, v in PRESETS["tiny"].items() if _get(paper, k) == v)
    assert diff(paper, paper) == []
    assert all(f.name in paper for f in dataclasses.fields(Config))


def _get(d, key):
    for part in key.split("."):
        d = d[part]
    return d
