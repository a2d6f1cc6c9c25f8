"""mt/checkpoint.py: what we save loads in transformers with the same logits; sharded checkpoints; a fresh
score head on a causal LM; bf16 loads; atomic saves; and one precise error per kind of bad directory."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mt.checkpoint as ckpt
from conftest import hf_model, ragged_batch
from mt.errors import UserError
from mt.checkpoint import CheckpointError, load_model, load_state_dict, read_config, read_weights, save_model

TOL = 1e-5


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@torch.no_grad()
def hf_logits(path, head, ids, mask):
    hf = hf_model(path, head)
    out = hf(input_ids=ids, attention_mask=mask).logits
    return out.squeeze(-1) if head == "score" else out


# ---- round trips through transformers


@pytest.mark.parametrize("family, head", [("llama", "lm"), ("qwen2", "lm"), ("llama", "score")])
@torch.no_grad()
def test_save_loads_in_transformers_with_same_logits(tiny_checkpoint, tmp_path, family, head):
    torch.manual_seed(0)
    src = tiny_checkpoint(family, head)
    ours = load_model(src)
    out = save_model(ours, tmp_path / "saved", tokenizer_dir=src)
    cfg = json.loads((out / "config.json").read_text())
    arch = {"llama": "Llama", "qwen2": "Qwen2"}[family] + ("ForSequenceClassification" if head == "score" else "ForCausalLM")
    assert cfg["architectures"] == [arch]
    # a policy's files are copied as they are (their stop list is complete already); the RM's pad
    # was eos and gets a token of its own (tests/test_checkpoint_consumers.py)
    same = ("tokenizer.json", "tokenizer_config.json") if head == "lm" else ()
    for name in same + ("generation_config.json",):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    if head == "score":
        assert cfg["pad_token_id"] == cfg["vocab_size"] - 1 == ours.cfg.vocab_size
    if family == "qwen2":  # tied: the head is the embedding, saved once as transformers does
        assert "lm_head.weight" not in load_file(out / "model.safetensors")
    ids, mask = ragged_batch([6, 9, 4], pad_id=cfg.get("pad_token_id") or 0, seed=1)
    if head == "lm":
        mine = ours(ids)
        m = mask.bool()
        assert (mine - hf_logits(out, head, ids, mask))[m].abs().max() <= TOL
    else:
        mine = ours.rewards(ids.masked_fill(mask == 0, 0), lengths=mask.sum(-1))  # pads: any id of ours
        assert (mine - hf_logits(out, head, ids, mask)).abs().max() <= TOL
    back = load_model(out)
    if head == "score":  # the added pad token's embedding row is the only difference
        emb = back.state_dict()["model.embed_tokens.weight"]
        assert torch.equal(emb[:-1], ours.state_dict()["model.embed_tokens.weight"])
        back.model.embed_tokens.weight.data = emb[:-1]
    assert_same_state(back, ours)  # and it reads back bit for bit


@torch.no_grad()
def test_sharded_checkpoint_loads_in_ours_and_transformers(tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    ours = load_model(tiny_llama_dir)
    out = save_model(ours, tmp_path / "sharded", tokenizer_dir=tiny_llama_dir, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ours.state_dict().values())
    assert_same_state(load_model(out), ours)
    ids, mask = ragged_batch([5, 8], seed=2)
    assert (ours(ids) - hf_logits(out, "lm", ids, mask))[mask.bool()].abs().max() <= TOL


@torch.no_grad()
def test_transformers_sharded_checkpoint_loads_in_ours(tiny_llama_dir, tmp_path):
    """A sharded directory written by transformers itself (not by us)."""
    hf = hf_model(tiny_llama_dir)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids, _ = ragged_batch([7], seed=3)
    assert (load_model(tmp_path / "hf")(ids) - hf(input_ids=ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_causal_lm_as_reward_model_gets_fresh_score_head(tiny_checkpoint, tmp_path, family):
    torch.manual_seed(0)
    src = tiny_checkpoint(family)
    lm = load_model(src)
    rm = load_model(src, head="score")
    assert rm.cfg.head == "score" and not hasattr(rm, "lm_head")
    assert set(rm.state_dict()) - set(lm.state_dict()) == {"score.weight"}
    for k, v in rm.state_dict().items():  # the backbone is the policy's, untouched
        if k != "score.weight":
            assert torch.equal(v, lm.state_dict()[k]), k
    w = rm.score.weight
    assert w.shape == (1, lm.cfg.hidden_size) and torch.isfinite(w).all()
    assert 0.005 < w.std().item() < 0.05  # initializer_range = 0.02, not uninitialised memory
    out = save_model(rm, tmp_path / "rm", tokenizer_dir=src)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1
    assert read_config(out).head == "score"
    ids, mask = ragged_batch([4, 7], pad_id=cfg["pad_token_id"], seed=4)
    mine = rm.rewards(ids.masked_fill(mask == 0, 0), lengths=mask.sum(-1))  # the pad may be a new id
    assert (mine - hf_logits(out, "score", ids, mask)).abs().max() <= TOL


@torch.no_grad()
def test_bf16_load_and_save(tiny_llama31_dir, tmp_path):
    torch.manual_seed(0)
    fp32 = load_model(tiny_llama31_dir)
    bf16 = load_model(tiny_llama31_dir, dtype="bf16")
    for k, v in bf16.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, fp32.state_dict()[k].to(torch.bfloat16)), k
    assert bf16.inv_freq.dtype == torch.float32 and torch.equal(bf16.inv_freq, fp32.inv_freq)
    ids, mask = ragged_batch([40, 25], seed=5)
    m = mask.bool()
    ref = fp32(ids)
    hf16 = hf_model(tiny_llama31_dir, dtype=torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
    ours16 = bf16(ids).float()
    # bf16 rounding is all that separates us from fp32, no more than it does for transformers in bf16
    hf_err, our_err = (hf16 - ref)[m].abs().mean(), (ours16 - ref)[m].abs().mean()
    assert our_err <= 1.5 * hf_err + 1e-3 and (ours16 - hf16)[m].abs().max() < 0.1
    out = save_model(bf16, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())
    assert_same_state(load_model(out, dtype=torch.bfloat16), bf16)
    # read_weights (rank 0's read under FSDP) keeps the stored dtype: no fp32 copy of an 8B model on the host
    cfg, sd = read_weights(out)
    assert cfg.head == "lm" and {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert sd.keys() == {k for k in bf16.state_dict()}
    torch.manual_seed(3)
    _, rm_sd = read_weights(out, head="score")
    torch.manual_seed(3)
    rm = load_model(out, head="score")  # the same fresh head from the same RNG state, fp32 as load_model draws it
    assert rm_sd["score.weight"].dtype == torch.float32 and torch.equal(rm_sd["score.weight"], rm.score.weight)
    assert "lm_head.weight" not in rm_sd and rm_sd["model.norm.weight"].dtype == torch.bfloat16


# ---- atomic writes


def test_save_replaces_atomically_and_cleans_up_on_failure(tiny_llama_dir, tmp_path, monkeypatch):
    model = load_model(tiny_llama_dir)
    out = save_model(model, tmp_path / "m")
    (out / "stale.txt").write_text("from an older save")
    save_model(model, out)  # overwrite: the old directory is swapped out whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "_write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp dirs, no half-written "new"
    assert_same_state(load_model(out), model)  # the previous save is intact


def test_save_state_dict_needs_cfg(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir)
    out = save_model(model.state_dict(), tmp_path / "sd", cfg=model.cfg)
    assert_same_state(load_model(out), model)
    with pytest.raises(AssertionError, match="needs cfg"):
        save_model(model.state_dict(), tmp_path / "sd2")


# ---- bad input: each a clear error naming the path and what is wrong


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_weights(d, fn):
    sd = load_file(d / "model.safetensors")
    save_file(fn(sd), d / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: model directory does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'}: missing; .* not a Hugging Face model"):
        load_model(tmp_path)


def test_config_invalid_json(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match=f"{d / 'config.json'}: invalid JSON"):
        load_model(d)


def test_unsupported_architecture(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value) == (f"{d / 'config.json'}: model_type='gpt2' is not supported; "
                            "supported: llama, mistral, qwen2")


def test_sliding_window_mistral(tiny_mistral_dir, copy_dir):
    d = copy_dir(tiny_mistral_dir)
    edit_config(d, sliding_window=4096)  # Mistral-7B-v0.1
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'config.json'}: sliding_window=4096 asks for sliding-window attention")
    assert '"sliding_window": null' in msg  # says what to change


def test_missing_tensor(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    edit_weights(d, lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value) == (f"{d}: weights do not match config.json (llama, 2 layers): missing 1 tensors, "
                            "e.g. ['model.layers.1.mlp.up_proj.weight']")


def test_config_with_more_layers_than_weights(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    edit_config(d, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"\(llama, 3 layers\): missing 9 tensors, e.g. \['model.layers.2."):
        load_model(d)


def test_unexpected_tensor(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    edit_weights(d, lambda sd: {**sd, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors, e.g. \['model.extra.weight'\]"):
        load_model(d)


def test_wrong_shape(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    edit_weights(d, lambda sd: {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(e.value) == (f"{d}: tensor model.layers.0.self_attn.k_proj.weight has shape (64, 64), "
                            "config.json implies (32, 64)")


def test_no_weights(tiny_llama_dir, copy_dir):
    d = copy_dir(tiny_llama_dir)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{d}: no model.safetensors or model.safetensors.index.json"):
        load_state_dict(d)


def test_index_lists_missing_shard(tiny_llama_dir, tmp_path):
    out = save_model(load_model(tiny_llama_dir), tmp_path / "sh", max_shard_bytes=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: listed in the index but missing"):
        load_model(out)


def test_index_invalid(tiny_llama_dir, tmp_path):
    out = save_model(load_model(tiny_llama_dir), tmp_path / "sh", max_shard_bytes=40_000)
    (out / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f"{out / 'model.safetensors.index.json'}: not a safetensors index"):
        load_model(out)


def test_reward_model_has_no_lm_head(tiny_rm_dir):
    with pytest.raises(CheckpointError, match=f"{tiny_rm_dir}: is a reward model"):
        load_model(tiny_rm_dir, head="lm")


def test_unknown_dtype(tiny_llama_dir):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; use one of float32, fp32, bfloat16"):
        load_model(tiny_llama_dir, dtype="int8")


def test_weights_follow_the_umask(tiny_llama_dir, tmp_path):
    """safetensors creates files 0600; every file of a saved directory gets the mode open() gives."""
    mask = os.umask(0o027)
    try:
        want = 0o666 & ~0o027
        old = ckpt.FILE_MODE
        ckpt.FILE_MODE = want  # FILE_MODE is read at import; this process's umask changed after it
        save_model(load_model(tiny_llama_dir), tmp_path / "m", tokenizer_dir=tiny_llama_dir)
    finally:
        os.umask(mask)
        ckpt.FILE_MODE = old
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == want, modes


def test_a_full_disk_is_one_user_error_and_the_saved_directory_is_untouched(tiny_llama_dir, tmp_path,
                                                                          monkeypatch):
    save_model(load_model(tiny_llama_dir), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def full(*a, **k):  # what safetensors raises when a write hits ENOSPC
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                        'message: "No space left on device" })')
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(UserError, match=r"model\.safetensors: the disk is full \(0\.\d\d GiB to write, "
                                        r"[\d.]+ GiB free\).*Fix: free space"):
        save_model(load_model(tiny_llama_dir), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directory left
