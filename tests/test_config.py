"""mt/config.py: the paper's appendix-B defaults, presets, the typed override parser and its errors,
and saved configs that read back identically."""

import dataclasses
import json

import pytest

from mt.config import PRESETS, Config, ConfigError, diff, flat_keys, from_dict, parse_args, save, to_dict


def test_paper_preset_holds_appendix_b():
    for cfg in (Config(), parse_args(["--preset", "paper"])):
        assert cfg.preset == "paper"
        # E-step DPO (Eq. 4)
        assert (cfg.dpo.beta, cfg.dpo.batch_size, cfg.dpo.lr, cfg.dpo.warmup_ratio) == (0.01, 128, 7e-7, 0.1)
        assert (cfg.dpo.save_every, cfg.dpo.epochs, cfg.dpo.max_length, cfg.dpo.loss) == (50, 1, 2048, "dpo")
        # sampling: M=5, T=0.8, top-p 0.95, max length 2048
        assert cfg.em.n_samples == 5
        assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens) == (0.8, 0.95, 2048)
        # model selection and filtering: τ=0.6, ε = 2 × variance, lqf, mixed RM data, |D_MS| = 2000
        assert (cfg.em.tau, cfg.em.eps_stat, cfg.em.eps_mult, cfg.em.filter) == (0.6, "var", 2.0, "lqf")
        assert (cfg.em.rm_data, cfg.em.d_ms_size, cfg.em.pair_rule) == ("mixed", 2000, "length_control")
        assert cfg.em.rm_restart and cfg.em.update_rm and cfg.em.select
        # M-step Bradley-Terry (Eq. 5): batch 512, lr 2e-6, 1 epoch
        assert (cfg.rm_train.batch_size, cfg.rm_train.lr, cfg.rm_train.epochs) == (512, 2e-6, 1)
        assert cfg.rm_train.max_length == 2048 and cfg.iters == 2


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
    (["--preset", "huge"], "--preset 'huge': unknown; presets: paper, sandbox, tiny"),
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
