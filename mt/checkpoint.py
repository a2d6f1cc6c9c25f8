"""Read and write Hugging Face model directories (config.json + safetensors), atomically.

What we save loads in `transformers` unchanged: same parameter names, same config fields, the
tokenizer and generation_config copied alongside. Under FSDP2, rank 0 alone reads the weights
(`load_for_training`) and alone writes them after a gather (`save_hf`).

Two fields are made right for the tools that read our checkpoints (README "Checkpoints other tools
read"): a policy's generation_config.json lists every stop id our sampler uses (chat.stop_ids), so
vLLM and `generate()` stop at the end of a turn; a reward model's pad id never occurs in text
(chat.rm_pad_token), so `transformers`' classifiers, which pool at the last non-pad token, score
the token we trained on. config.json, tokenizer_config.json and special_tokens_map.json agree on it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)

from mt import chat, dist
from mt.data import FILE_MODE
from mt.dist import resolve_dtype
from mt.errors import UserError
from mt.model import ConfigError, ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")
ARCHITECTURES = {("llama", "lm"): "LlamaForCausalLM", ("llama", "score"): "LlamaForSequenceClassification",
                 ("mistral", "lm"): "MistralForCausalLM", ("mistral", "score"): "MistralForSequenceClassification",
                 ("qwen2", "lm"): "Qwen2ForCausalLM", ("qwen2", "score"): "Qwen2ForSequenceClassification"}
class CheckpointError(UserError):
    """A model directory we cannot read; the message names the path and what is wrong."""


def read_config(path, head: str | None = None) -> ModelConfig:
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path}: is a file, not a model directory. Fix: give the Hugging Face "
                              "directory that holds config.json and *.safetensors")
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist (expected a Hugging Face directory "
                              "with config.json and *.safetensors). Fix: check the path")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; {path} is not a Hugging Face model directory")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(d, head=head, source=str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a \"weight_map\" object): "
                                  f"{type(e).__name__}: {e}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(PyTorch .bin checkpoints are not read: convert them to safetensors)")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


def load_state_dict(path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files, read straight onto `device`
    (safetensors' device=: on a GPU no host copy of the weights, on any rank)."""
    sd = {}
    for f in weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for k in fh.keys():
                    sd[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for a cut or foreign file
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e}); a copy cut "
                                  "short? Fix: copy or save the checkpoint again") from None
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or infinite values: the checkpoint is broken "
                                  "(a diverged run?). Fix: use an earlier checkpoint")
    return sd


def read_weights(path, head: str | None = None,
                 device="cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and the weights of a Hugging Face directory, checked against each other, in the dtype they
    are stored in (nothing is cast or copied into a model: a bf16 8B checkpoint stays 16 GB).

    head="score" on a causal-LM directory gives a reward model with a fresh score head, drawn here in fp32
    from the CPU generator, so the same seed gives the same head on any device and in any dtype (the usual
    way to start an RM from a policy); head="lm" on an RM directory is an error. A tied head is left out (the embedding is the head); rotary buffers are rebuilt, never read.
    """
    path = Path(path)
    cfg = read_config(path, head=head)
    src_head = read_config(path).head
    if src_head == "score" and cfg.head == "lm":
        raise CheckpointError(f"{path}: is a reward model (score head); it has no LM head to load")
    if src_head == "score":
        warn_pad_is_eos(path, cfg.hf)
    sd = {k: v for k, v in load_state_dict(path, device).items()
          if not k.endswith("rotary_emb.inv_freq")}
    fresh_score = src_head == "lm" and cfg.head == "score"
    if fresh_score or (cfg.head == "lm" and cfg.tie_word_embeddings):
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()  # names and shapes only: no memory
    expected = set(shapes) - ({"lm_head.weight"} if cfg.head == "lm" and cfg.tie_word_embeddings else set())
    missing = sorted(expected - set(sd) - ({"score.weight"} if fresh_score else set()))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json ({cfg.model_type}, {cfg.num_hidden_layers} layers): "
            + (f"missing {len(missing)} tensors, e.g. {missing[:3]}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}" if unexpected else ""))
    for k, v in sd.items():
        if v.shape != shapes[k].shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(shapes[k].shape)}")
    if fresh_score:
        w = torch.empty(shapes["score.weight"].shape, dtype=torch.float32)
        sd["score.weight"] = w.normal_(std=cfg.hf.get("initializer_range", 0.02)).to(device)
    return cfg, sd


def load_model(path, dtype=torch.float32, device="cpu", head: str | None = None) -> Transformer:
    """Load a Hugging Face directory into our model, in `dtype` on `device` (see read_weights for `head`).

    The weights are read onto `device` directly (sampling and scoring on a GPU: no full copy in host
    memory on every rank); at the peak the device holds them as stored plus the model, until return."""
    dtype = resolve_dtype(dtype, device)
    cfg, sd = read_weights(path, head, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    # cast while still on meta (free), so memory is allocated once, in the dtype asked for
    model.to(dtype).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)  # copies (and casts) into our dtype; read_weights checked the keys
    return model


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json we write: the source config with the architecture and head fields made right."""
    d = {k: v for k, v in cfg.hf.items() if k not in ("_name_or_path", "transformers_version")}
    d["architectures"] = [ARCHITECTURES[(cfg.model_type, cfg.head)]]
    d["model_type"] = cfg.model_type
    d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
    if cfg.head == "score":
        d["num_labels"] = 1
        d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    else:
        d.pop("id2label", None), d.pop("label2id", None), d.pop("num_labels", None)
    return d


def save_model(model_or_state, out_dir, cfg: ModelConfig | None = None, tokenizer_dir=None,
               generation_config: dict | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a Hugging Face directory atomically: a temp directory in the same parent, then a rename.

    `model_or_state` is our Transformer or a full (gathered) state dict, with `cfg` then required.
    Files from `tokenizer_dir` (tokenizer, chat template, generation_config) are copied alongside.
    With `tokenizer_dir`, a policy's generation_config.json gets the full stop list
    (policy_generation_config) and a reward model a pad id that never occurs in text
    (chat.rm_pad_token: config.json, tokenizer_config.json and special_tokens_map.json agree; a
    token added to the vocabulary grows the embedding by its row, the mean of the others).
    """
    if isinstance(model_or_state, Transformer):
        cfg = model_or_state.cfg
        state = model_or_state.state_dict()
    else:
        state = model_or_state
        assert cfg is not None, "save_model(state_dict, ...) needs cfg"
    if cfg.head == "lm" and cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype
    config = hf_config(cfg, dtype)
    tok = _tokenizer(tokenizer_dir)
    pad = None
    if cfg.head == "score" and tok is not None:
        pad = chat.rm_pad_token(tok, cfg.vocab_size, avoid=_ids(cfg.hf.get("eos_token_id")))
        config["pad_token_id"] = pad.id
        if pad.id >= cfg.vocab_size:  # an added token past the embedding: one more row
            state = dict(state)
            emb = state["model.embed_tokens.weight"]
            row = emb.float().mean(0, keepdim=True).to(emb.dtype)
            state["model.embed_tokens.weight"] = torch.cat([emb, row.expand(pad.id + 1 - len(emb), -1)])
            config["vocab_size"] = pad.id + 1
    elif cfg.head == "lm" and tok is not None:
        generation_config = policy_generation_config(tok, tokenizer_dir, generation_config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        if pad is not None:
            write_pad_token(tmp, pad, tok)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_shards(state, tmp, max_shard_bytes)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- the fields other tools read: stop ids (policies), the pad id (reward models)


def _ids(v) -> list[int]:
    """An id field of config.json / generation_config.json (an int, a list of ints, or null)."""
    return [] if v is None else [int(i) for i in v] if isinstance(v, list) else [int(v)]


def _tokenizer(tokenizer_dir):
    """The tokenizer saved beside a checkpoint, or None where there is none with a chat template (its
    files are then copied as they are: without the template we cannot tell the end of a turn)."""
    if tokenizer_dir is None:
        return None
    try:
        return chat.load_tokenizer(tokenizer_dir)
    except chat.ChatTemplateError:
        return None


def policy_generation_config(tok, tokenizer_dir, given: dict | None = None) -> dict | None:
    """The generation_config a policy we write carries: `given` (or tokenizer_dir's file) with
    eos_token_id the full stop list our sampler uses (chat.stop_ids), so vLLM and `generate()` stop
    at the end-of-turn token too (vllm#4180: a Llama-3 config listing <|end_of_text|> alone).
    None means copy tokenizer_dir's file unchanged: it already lists every stop id."""
    path = Path(tokenizer_dir) / "generation_config.json"
    base = given if given is not None else chat.generation_config(path) if path.is_file() else None
    stops = sorted(set(chat.stop_ids(tok, tokenizer_dir)) | set(_ids((given or {}).get("eos_token_id"))))
    if base is not None and set(_ids(base.get("eos_token_id"))) == set(stops):
        return given
    out = dict(base) if base is not None else (
        {"bos_token_id": tok.bos_token_id} if tok.bos_token_id is not None else {})
    out["eos_token_id"] = stops
    return out


def write_pad_token(out: Path, pad: "chat.PadChoice", tok):
    """Make the copied tokenizer files declare `pad` (config.json is written by the caller): the pad
    entry of tokenizer_config.json and special_tokens_map.json (created when the pad changes and the
    source had none), and for an added token its entry in tokenizer.json, tokenizer_config.json's
    added_tokens_decoder and added_tokens.json (slow tokenizers). Read back to check."""
    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.is_file() else None

    def save(name, d):
        (out / name).write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    entry = {"content": pad.token, "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False}
    tc = load("tokenizer_config.json") or {}
    changed = content(tc.get("pad_token")) != pad.token
    if pad.how == "added":
        tj = load("tokenizer.json")
        if tj is not None:
            tj.setdefault("added_tokens", []).append({"id": pad.id, **entry, "special": True})
            save("tokenizer.json", tj)
        else:
            save("added_tokens.json", {**(load("added_tokens.json") or {}), pad.token: pad.id})
        if "added_tokens_decoder" in tc:
            tc["added_tokens_decoder"][str(pad.id)] = {**entry, "special": True}
    if changed or pad.how == "added":
        tc["pad_token"] = pad.token
        save("tokenizer_config.json", tc)
    sm = load("special_tokens_map.json")
    if sm is None and changed:
        sm = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token") if tc.get(k) is not None}
    if sm is not None and content(sm.get("pad_token")) != pad.token:
        style = sm.get("eos_token", sm.get("bos_token"))
        sm["pad_token"] = entry if isinstance(style, dict) else pad.token
        save("special_tokens_map.json", sm)
    gen = load("generation_config.json")
    if gen is not None and "pad_token_id" in gen and gen["pad_token_id"] != pad.id:
        gen["pad_token_id"] = pad.id
        save("generation_config.json", gen)
    back = chat.load_tokenizer(out)
    if (back.pad_token_id, back.convert_tokens_to_ids(pad.token)) != (pad.id, pad.id):
        raise CheckpointError(f"{out}: wrote pad token {pad.token!r} (id {pad.id}) but the tokenizer reads "
                              f"back pad id {back.pad_token_id}; tokenizer files of {tok.name_or_path} "
                              "not understood")


def warn_pad_is_eos(path, config: dict):
    """A reward model whose config.json has pad_token_id among its eos ids is mis-read by every tool
    that pools at the last non-pad token; ours read lengths and are unaffected."""
    pad = config.get("pad_token_id")
    if pad is None or int(pad) not in _ids(config.get("eos_token_id")):
        return
    warnings.warn(
        f"{path}: config.json has pad_token_id == eos_token_id ({pad}). transformers' "
        "*ForSequenceClassification (and so RewardBench's run_rm.py, TRL, OpenRLHF) pools at the last "
        "token that is not the pad id, so on a chat ending in that token it scores one token early. "
        "Our scoring reads lengths and is unaffected; an RM that train_rm.py / run_em.py writes gets a "
        "pad id of its own (mt.checkpoint.save_model).", stacklevel=3)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """safetensors' save_file, with the mode open() would give (it creates files 0600) and a full
    disk as a user error naming the path and the space needed."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        if "No space left" not in str(e) and getattr(e, "errno", None) != errno.ENOSPC:
            raise
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        free = shutil.disk_usage(path.parent).free
        raise UserError(f"{path}: the disk is full ({need / 2**30:.2f} GiB to write, "
                        f"{free / 2**30:.2f} GiB free). Nothing already saved was changed. Fix: free "
                        "space there (or give --out on a larger disk) and rerun the same command: it "
                        "resumes") from None
    os.chmod(path, FILE_MODE)


def _write_shards(state: dict, out: Path, max_shard_bytes: int):
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + n
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_tensors(shards[0], out / "model.safetensors", meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, out / name, meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def replace_dir(tmp: Path, out: Path):
    """Swap a finished temp directory into place; the old one is removed only after the swap."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_replaced(out: Path, complete) -> Path | None:
    """Undo a kill between replace_dir's two renames: `out` is gone, the new directory waits complete
    in its temp name and the old one is renamed aside. Put back the newest complete one (the new, else
    the old) and return it; None when `out` exists or nothing complete is left."""
    if out.exists():
        return None
    new = sorted(out.parent.glob(f".{out.name}.tmp-*"), key=lambda q: q.stat().st_mtime, reverse=True)
    for q in new + sorted(out.parent.glob(f".{out.name}.old-*")):
        if complete(q):
            os.replace(q, out)
            _fsync_dir(out.parent)
            return q
    return None


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- under FSDP2: rank 0 reads, every rank receives its shards; gather to rank 0 to write


def load_for_training(path, cfg, head: str | None = None, device=None, fsdp: bool | None = None):
    """The Hugging Face model at `path`, prepared for training (dist.prepare_model). Under FSDP only
    rank 0 reads the weights: every rank shards an empty (meta-device) model, then receives its shards
    from rank 0, so the host holds one copy of the weights in their stored dtype, not one per rank nor
    an fp32 one. Without FSDP it is prepare_model(load_model(path))."""
    d = dist.get()
    device = torch.device(device or d.device)
    if not dist.uses_fsdp(cfg, device, fsdp):
        return dist.prepare_model(load_model(path, torch.float32, "cpu", head=head), cfg, device, fsdp=False)
    with torch.device("meta"):
        model = Transformer(read_config(path, head=head))  # config.json only: cheap on every rank
    model.tie_weights()  # one shared parameter, so FSDP shards (and the optimizer updates) it once
    dist.prepare_model(model, cfg, device, fsdp=True)
    full, err = {}, None
    if d.is_main:
        try:
            # as stored (bf16 stays bf16: half an fp32 copy), with load_model's checks; a fresh score
            # head is drawn from rank 0's RNG and broadcast, so every rank starts from the same head
            _, full = read_weights(path, head=head)
            if model.cfg.head == "lm" and model.cfg.tie_word_embeddings:
                full["lm_head.weight"] = full["model.embed_tokens.weight"]  # one parameter, both names
        except Exception as e:
            err = e
    # a bad directory must stop every rank, not leave ranks 1.. waiting in the broadcast
    msg = dist.broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if msg is not None:
        raise CheckpointError(f"{path}: rank 0 could not load the weights: {msg}")
    # one tensor at a time from rank 0, in its stored dtype; each rank casts its own shard into the
    # fp32 master weights (DCP's full-state-dict path copies into the existing shards)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def full_state_dict(model) -> dict:
    """The whole model's weights on rank 0's CPU (empty elsewhere); a collective under FSDP."""
    if dist.is_sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if dist.get().is_main else {}


def save_hf(model, path, save_dtype: torch.dtype, tokenizer_dir=None, generation_config=None):
    """Gather the weights to rank 0 and write a Hugging Face directory (atomic: temp dir, then rename)."""
    sd = full_state_dict(model)
    if dist.get().is_main:
        save_model({k: v.to(save_dtype) for k, v in sd.items()}, path, cfg=model.cfg, tokenizer_dir=tokenizer_dir,
                   generation_config=generation_config)
    dist.barrier()
