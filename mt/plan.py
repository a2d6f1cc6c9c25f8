"""`python run_em.py plan`: what a run will need (memory per GPU, host RAM, time, disk), on a laptop.

    python run_em.py plan --preset paper --policy DIR --rm DIR --prompts FILE --plan.gpus 8 --plan.gpu_gib 80

Reads config.json of both models, the tokenizer and the prompt file; no weights, no GPU, no network.
- Training steps (DPO, RM) and the reference pass are MEASURED, not estimated: the project's own model,
  `dist.prepare_model` (FSDP2, mixed precision, activation checkpointing), `train.make_optimizer`, and the
  objectives' `step` run on fake tensors (FakeTensorMode) over a fake process group of --plan.gpus ranks,
  under torch's FSDPMemTracker. Fake CPU tensors stand for the GPU (FSDP2 cannot build a cuda mesh in a
  CPU-only torch). Memory is affine in the number of blocks (every block is the same), so each step runs
  at two shallow depths (3 and 5 blocks) and is extrapolated to the model's (--plan.exact runs the full depth instead;
  tests/test_plan.py checks the two agree).
- Sampling and scoring are sized from the sampler's own allocation (`sampler.cache_sizes`, KVCache and
  _Rows built on the meta device), plus the bf16 weights every rank holds while sampling.
- Tokens, FLOPs (2·N per token forward, 6·N training) and time at the stated throughput and MFU; disk.
Exit status 3 when something does not fit (2 stays a bad input, mt/errors.py); the verdict names the flag.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.tensor._sharding_prop as sharding_prop
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from mt import chat, dist, em, sampler
from mt import config as C
from mt.checkpoint import read_config
from mt.data import read_prompts, write_json
from mt.logps import response_logps
from mt.losses import BRADLEY_TERRY, preference_objective
from mt.model import KVCache, ModelConfig, Transformer, kv_bytes_per_position
from mt.train import collate, make_optimizer

GiB = 2**30
NOT_FIT = 3  # exit status when something will not fit


@dataclass
class PlanConfig:
    """Planning (`python run_em.py plan`): the machines, their speed, and the search's time budget."""
    gpus: int = C.opt(8, above=0)  # processes (one GPU each) the run will use
    gpus_per_node: int = C.opt(8, above=0)  # for host RAM per node
    gpu_gib: float = C.opt(80.0, above=0)  # memory per GPU (H100 SXM: 80 GB)
    # CUDA context, NCCL buffers and allocator fragmentation: not tensors, so no tracker sees them
    reserve_gib: float = C.opt(4.0, min=0)
    host_gib: float = C.opt(1024.0, above=0)  # host RAM per node
    # dense bf16 TFLOP/s per GPU: NVIDIA's H100 SXM datasheet (989, without sparsity)
    peak_tflops: float = C.opt(989.0, above=0)
    mfu: float = C.opt(0.3, above=0)  # model FLOPs utilisation of training / scoring: a typical FSDP figure
    tokens_per_s_per_gpu: float = C.opt(2000.0, above=0)  # sampling throughput per GPU (decode-bound)
    # mean response length as a share of --sampling.max_new_tokens, for time and disk (1 = every
    # response hits the cap, the worst case; memory is always planned at the cap)
    response_frac: float = C.opt(1.0, above=0)
    budget_s: float = C.opt(90.0, above=0)  # wall time for the micro-batch search (results are cached)
    exact: bool = False  # measure each training step at the model's full depth (slower) instead of two
    cache_dir: str = str(Path.home() / ".cache" / "mutual_taught" / "plan")  # measured steps, per shape


@dataclass
class PlanArgs(C.Config):
    """The run's own flags (C.Config) plus --plan.*."""
    plan: PlanConfig = field(default_factory=PlanConfig)


def parse(argv: list[str]) -> PlanArgs:
    doc = ("Plan a run: memory per GPU of every stage (training steps measured on fake tensors over a "
           "fake process group), host RAM, tokens, FLOPs, time and disk. Takes the run's own flags. "
           f"Exit status {NOT_FIT} when something will not fit.")
    return C.parse(argv, PlanArgs(), "python run_em.py plan", doc)


# ---- the training steps, measured on fake tensors


class _BoundNonzero(TorchDispatchMode):
    """`nonzero` returns as many rows as the host-built batch has response positions: its output shape
    depends on data, which fake tensors do not hold (response_logps calls it once per forward)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            return torch.empty((self.n, args[0].dim()), dtype=torch.long, device=args[0].device)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fake_world(world: int):
    """A fake process group of `world` ranks (this process is rank 0), and two patches for planning:
    the device mesh is built outside the fake mode (its constructor reads a tensor's values), and DTensor's
    sharding propagation runs in its own fake mode: in the active one, FSDPMemTracker counts its
    global-shape scratch tensors as this rank's memory (the optimizer step then reads 8x too high)."""
    if tdist.is_initialized():
        raise RuntimeError("planning needs its own (fake) process group; run it in a plain process")
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh, detect = dist.init_device_mesh, sharding_prop.detect_fake_mode

    def mesh_outside_fake(*a, **k):
        with unset_fake_temporarily():
            return mesh(*a, **k)
    dist.init_device_mesh, sharding_prop.detect_fake_mode = mesh_outside_fake, (lambda *a: None)
    try:
        yield
    finally:
        dist.init_device_mesh, sharding_prop.detect_fake_mode = mesh, detect
        tdist.destroy_process_group()


def worst_batch(micro: int, length: int, refs: bool):
    """micro pairs of `length` tokens each, all but the first a response token: the most a step holds."""
    ex = [chat.Example(str(i), str(i), tuple([1] * length), 1, tuple([2] * length), 1) for i in range(micro)]
    return collate(ex, True, 0, "cpu", refs={str(i): (0.0, 0.0) for i in range(micro)} if refs else None)


def measure_step(mcfg: ModelConfig, kind: str, tcfg: C.TrainConfig, micro: int, length: int,
                 fake: bool = True) -> dict:
    """Peak bytes per rank of one training step (kind "dpo" | "rm") or reference forward ("ref"), by
    category, under the current process group: two steps, so the second holds AdamW's moments. fake=False
    runs it on real CPU tensors (what tests/test_plan.py compares against)."""
    tcfg = dataclasses.replace(tcfg, micro_batch_size=micro,
                               dtype="bf16" if tcfg.dtype == "auto" else tcfg.dtype)  # as on a GPU
    objective = BRADLEY_TERRY if kind == "rm" else preference_objective(getattr(tcfg, "loss", "dpo"))
    batch = worst_batch(micro, length, refs=kind == "dpo" and objective.uses_reference)
    n_rows = int(batch.loss_mask[:, 1:].sum())  # response positions: nonzero's output size
    with torch.device("meta"):
        model = Transformer(mcfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        dist.prepare_model(model, tcfg, torch.device("cpu"), fsdp=True)
        opt = make_optimizer(model, tcfg) if kind != "ref" else None
        if fake:
            batch = dataclasses.replace(batch, **{k: mode.from_tensor(v) for k, v in vars(batch).items()
                                                  if isinstance(v, torch.Tensor)})
        tracker = FSDPMemTracker(model, opt)
        tracker.track_inputs((batch.ids,))
        with tracker, (_BoundNonzero(n_rows) if fake else contextlib.nullcontext()):
            for i in range(1 if kind == "ref" else 2):
                if i:
                    tracker.reset_mod_stats()  # the tracker's per-module stats are per iteration
                if kind == "ref":  # train_policy.reference_logps: a no-grad forward
                    with torch.no_grad():
                        response_logps(model, batch.ids, batch.loss_mask)
                    continue
                loss, _ = objective.step(model, batch, tcfg)  # the loop in mt/train.py, one micro-batch
                loss.sum().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
                opt.step()
                opt.zero_grad(set_to_none=True)
        snap = tracker.get_tracker_snapshot("peak")
    (dev_snap,) = snap.values()
    return {str(getattr(k, "value", k)): int(v) for k, v in dev_snap.items()}


def _depth(mcfg: ModelConfig, layers: int) -> ModelConfig:
    return dataclasses.replace(mcfg, num_hidden_layers=layers)


def plan_step(mcfg: ModelConfig, kind: str, tcfg: C.TrainConfig, micro: int, length: int, world: int,
              exact: bool = False, cache_dir: str | None = None) -> dict:
    """measure_step at the full depth (exact) or at 3 and 5 blocks, extrapolated (memory is affine in the
    number of identical blocks from 3 on; at 2 the peak sits elsewhere without activation checkpointing);
    cached on disk per shape. Opens its own fake group of `world` ranks."""
    key = json.dumps([{k: v for k, v in vars(mcfg).items() if k != "hf"}, kind,
                      {k: v for k, v in vars(tcfg).items() if k in ("dtype", "activation_checkpointing",
                                                                     "loss")},
                      micro, length, world, exact, torch.__version__], sort_keys=True, default=str)
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json" if cache_dir else None
    if path and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # a cut or foreign cache entry: measured again, rewritten
            pass
    L = mcfg.num_hidden_layers
    with _fake_world(world):
        if exact or L <= 5:
            out = measure_step(mcfg, kind, tcfg, micro, length)
        else:  # the total is affine in depth; a category only while the peak stays at the same point
            a, b = (measure_step(_depth(mcfg, d), kind, tcfg, micro, length) for d in (3, 5))
            out = {k: round(a[k] + (b[k] - a[k]) * (L - 3) / 2) for k in a.keys() & b.keys()}
    if path:
        write_json(path, out)  # atomically: a kill leaves no cut entry
    return out


# ---- sampling and scoring, from the sampler's own allocation


def sampling_bytes(mcfg: ModelConfig, s: C.SamplingConfig, slots: int | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes per rank of a sampling pass at the run's caps (a prompt of max_prompt_tokens, every slot
    busy): bf16 weights (every rank holds them whole: sampler.gathered), the KV caches the engine
    allocates (sampler.cache_sizes, KVCache built on meta), its per-row state, one step's logits."""
    s = dataclasses.replace(s, slots=slots or s.slots)
    sizes = sampler.cache_sizes(s, s.slots, s.max_prompt_tokens, s.max_prompt_tokens - 1)
    kv = sum(b.numel() * b.element_size() for rows, length in sizes.values()
             for b in KVCache(mcfg, rows, length, dtype, "meta").buffers())
    vocab = sampler.missed_logits_vocab(s, mcfg.vocab_size, "cuda")  # the GPU's harvest interval
    state = sampler._Rows.new(sizes["cache"][0], s.max_new_tokens, False, vocab, "meta")
    rows = sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
    # _Engine.step: the model's bf16 logits (slots, 1, V) and their fp32 copy
    logits = sizes["cache"][0] * mcfg.vocab_size * (2 + 4)
    w = dtype.itemsize * num_params(mcfg)
    return {"weights": w, "kv_cache": kv, "rows": rows, "logits": logits, "Total": w + kv + rows + logits}


def paged_rows(mcfg: ModelConfig, s: C.SamplingConfig, gpu: int, mean_len: float) -> dict[str, float]:
    """The paged cache on a GPU (sampler.pool_blocks: every slot's longest row, at most the free memory
    less sampler.HEADROOM): its bytes, and how many rows it holds at once at the caps and at `mean_len`
    positions (rows beyond wait their turn). `need` is what a pass needs at least: one row at the caps."""
    samp = sampling_bytes(mcfg, s, dtype=torch.bfloat16)
    rest = samp["Total"] - samp["kv_cache"]  # weights, per-row state, logits
    per_pos = kv_bytes_per_position(mcfg, 2)  # bf16
    caps = s.max_prompt_tokens + s.max_new_tokens
    pool = max(0, min(s.slots * caps * per_pos, gpu - rest - sampler.HEADROOM))
    return {"rest": rest, "pool": pool, "Total": rest + pool + sampler.HEADROOM,
            "need": rest + sampler.HEADROOM + caps * per_pos,
            "at_caps": min(s.slots, pool // (caps * per_pos)),
            "at_mean": min(s.slots, int(pool // (mean_len * per_pos)))}


def max_slots(mcfg: ModelConfig, s: C.SamplingConfig, budget: int) -> int:
    """The largest --sampling.slots whose pass fits `budget` bytes (sampling_bytes is linear in slots)."""
    one, two = sampling_bytes(mcfg, s, 1)["Total"], sampling_bytes(mcfg, s, 2)["Total"]
    return max(0, (budget - (2 * one - two)) // (two - one))


SCORE_TOKENS = 32768  # mt/scoring.py score_conversations: padded tokens per batch


def scoring_bytes(mcfg: ModelConfig) -> dict[str, int]:
    """An ESTIMATE (not measured): bf16 RM weights and one block's transient activations for a batch of
    SCORE_TOKENS tokens (residual, normed input, attention output, gate/up/product of the MLP)."""
    w = 2 * num_params(mcfg)
    act = SCORE_TOKENS * 2 * (4 * mcfg.hidden_size + 3 * mcfg.intermediate_size)
    return {"weights": w, "activations": act, "Total": w + act}


def num_params(mcfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(mcfg).parameters())


# ---- the plan


def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def _hms(s: float) -> str:
    h, m = divmod(round(s) // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{round(s) % 60:02d}s"


def _count(x: float) -> str:
    for unit, k in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= k:
            return f"{x / k:.3g}{unit}"
    return f"{x:.3g}"


def plan(cfg: PlanArgs, out=print) -> int:
    """Print the plan; return 0, or NOT_FIT when something will not fit."""
    P, S, E, W = cfg.plan, cfg.sampling, cfg.em, cfg.plan.gpus
    pol, rm = read_config(cfg.policy), read_config(cfg.rm)
    Np, Nr = num_params(pol), num_params(rm)
    gpu = int((P.gpu_gib - P.reserve_gib) * GiB)  # what tensors may use
    tok = chat.load_tokenizer(cfg.policy)
    prompts = read_prompts(cfg.prompts)
    lens = [len(chat.encode_prompt(tok, p["prompt"])) for p in prompts]
    mean_prompt = sum(lens) / len(lens)
    parts = em.partition([p["prompt_id"] for p in prompts], cfg.iters,
                         E.rm_fraction if E.update_rm else 0.0, E.d_ms_size, cfg.seed)
    new = P.response_frac * S.max_new_tokens  # mean response tokens, for time and disk
    fixes: list[str] = []
    out(f"plan: {W} GPUs × {P.gpu_gib:g} GiB ({P.reserve_gib:g} GiB each kept for CUDA/NCCL), "
        f"policy {Np / 1e9:.2f}B params, RM {Nr / 1e9:.2f}B params; {len(prompts)} prompts "
        f"(mean {mean_prompt:.0f}, longest {max(lens)} tokens)")

    # ---- memory per rank of each stage
    t0 = time.perf_counter()

    def step(mcfg, kind, tcfg, micro, ac):
        t = dataclasses.replace(tcfg, activation_checkpointing=ac)
        return plan_step(mcfg, kind, t, micro, tcfg.max_length, W, P.exact, P.cache_dir)["Total"]
    dpo = step(pol, "dpo", cfg.dpo, cfg.dpo.micro_batch_size, cfg.dpo.activation_checkpointing)
    ref = step(pol, "ref", cfg.dpo, 2 * cfg.dpo.micro_batch_size, False)
    rmt = step(rm, "rm", cfg.rm_train, cfg.rm_train.micro_batch_size, cfg.rm_train.activation_checkpointing)
    samp, score = sampling_bytes(pol, S), scoring_bytes(rm)
    paged = S.kv_cache != "dense"  # auto is paged on a GPU (mt/sampler.py)
    if paged:
        pg = paged_rows(pol, S, gpu, mean_prompt + new)
        samp = dict(samp, kv_cache=pg["pool"], Total=pg["need"] if pg["need"] > gpu else pg["Total"])
        kv = (f"paged KV {_gib(pg['pool'])} (up to the free memory less {_gib(sampler.HEADROOM)}; "
              f"{S.slots} slots)")
    else:
        kv = f"KV {_gib(samp['kv_cache'])} ({S.slots} slots × {S.max_prompt_tokens}+{S.max_new_tokens})"
    save_gpu = max(p.numel() for p in _meta_params(pol)) * 4  # one fp32 tensor gathered at a time
    rows = [("sampling", samp["Total"], f"weights {_gib(samp['weights'])} + {kv} + logits {_gib(samp['logits'])}"),
            ("scoring", score["Total"], "estimate: weights + one block's activations"),
            ("reference pass", ref, f"measured, {2 * cfg.dpo.micro_batch_size} pairs, no grad"),
            ("DPO step", dpo, f"measured, micro {cfg.dpo.micro_batch_size}, "
             f"AC {'on' if cfg.dpo.activation_checkpointing else 'off'}"),
            ("selection", max(samp["Total"], score["Total"]), "sampling, then scoring"),
            ("pseudo-pairs", max(samp["Total"], score["Total"]), "sampling, then scoring"),
            ("RM step", rmt, f"measured, micro {cfg.rm_train.micro_batch_size}, "
             f"AC {'on' if cfg.rm_train.activation_checkpointing else 'off'}"),
            ("checkpoint save", save_gpu, "largest parameter gathered in fp32")]
    out(f"\nmemory per GPU (fits in {_gib(gpu)}):")
    for name, b, how in rows:
        ok = "ok " if b <= gpu else "NO "
        out(f"  {ok} {name:<16} {_gib(b):>10}   {how}")
    host = {"sampling load": P.gpus_per_node * 2 * Np, "training load": 2 * Np, "checkpoint save": 6 * Np}
    out(f"host RAM per node (of {P.host_gib:g} GiB): " + ", ".join(
        f"{k} {_gib(v)}" for k, v in host.items()) + "  (every rank reads the bf16 weights to sample; "
        "rank 0 reads them to train and gathers fp32 + a bf16 copy to save)")
    slots = max_slots(pol, S, gpu)
    per_slot = (sampling_bytes(pol, S, 2)['kv_cache'] - sampling_bytes(pol, S, 1)['kv_cache']) / GiB
    if paged:
        out(f"rows decoding at once in the paged KV cache: {pg['at_caps']} at the caps ({S.max_prompt_tokens}"
            f"+{S.max_new_tokens}), {pg['at_mean']} at the mean length ({mean_prompt:.0f}+{new:.0f}); "
            f"of --sampling.slots {S.slots}, the rest wait ({per_slot:.2f} GiB of KV per row at the caps)")
    else:
        out(f"largest --sampling.slots at the caps ({S.max_prompt_tokens}+{S.max_new_tokens}): {slots} "
            f"({per_slot:.2f} GiB of KV per slot)")
    if samp["Total"] > gpu:
        fixes.append("sampling: the weights alone do not fit. Fix: a GPU with more memory" if not slots else
                     f"sampling: the weights and one row at the caps need {_gib(samp['Total'])} > {_gib(gpu)}. "
                     "Fix: lower --sampling.max_new_tokens, or a GPU with more memory" if paged else
                     f"sampling: {_gib(samp['Total'])} > {_gib(gpu)}. Fix: --sampling.slots {slots}")
    if score["Total"] > gpu:
        fixes.append(f"scoring: {_gib(score['Total'])} > {_gib(gpu)}. Fix: a GPU with more memory")

    # ---- micro-batch search: 1, 2, 4, ... with and without activation checkpointing, within the budget
    out(f"\nmicro-batch sizes per rank that fit (measured; search budget {P.budget_s:g}s, cached in "
        f"{P.cache_dir}):")
    search = {(name, ac): (mcfg, kind, t, []) for name, mcfg, kind, t in
              (("dpo", pol, "dpo", cfg.dpo), ("rm_train", rm, "rm", cfg.rm_train)) for ac in (True, False)}
    b, open_ = 1, set(search)
    while open_:  # breadth first: every setting gets its 1 before any gets its 2
        for key in sorted(open_, key=list(search).index):
            mcfg, kind, t, got = search[key]
            if b > max(1, t.batch_size // W) or time.perf_counter() - t0 > P.budget_s:
                got.append(f"{b}: not tried (budget)" if b <= t.batch_size // W else "")
                open_.discard(key)
                continue
            peak = step(mcfg, kind, t, b, key[1])
            got.append(f"{b}: {_gib(peak)}{'' if peak <= gpu else ' NO'}")
            if peak > gpu:
                open_.discard(key)
        b *= 2
    for (name, ac), (_, _, _, got) in search.items():
        out(f"  --{name}.micro_batch_size, AC {'on ' if ac else 'off'}: " + ", ".join(g for g in got if g))
    for name, b, t in (("dpo", dpo, cfg.dpo), ("rm_train", rmt, cfg.rm_train)):
        if b > gpu:
            ac_on = dataclasses.replace(t, activation_checkpointing=True)
            fix = (f"--{name}.activation_checkpointing true" if not t.activation_checkpointing and
                   step(rm if name == "rm_train" else pol, "rm" if name == "rm_train" else "dpo", ac_on,
                        t.micro_batch_size, True) <= gpu
                   else f"a smaller --{name}.micro_batch_size (above) or more --plan.gpus")
            fixes.append(f"{name} step: {_gib(b)} > {_gib(gpu)}. Fix: {fix}")
        if t.batch_size % (t.micro_batch_size * W):
            fixes.append(f"--{name}.batch_size={t.batch_size} is not a multiple of micro "
                         f"{t.micro_batch_size} × {W} GPUs. Fix: change --{name}.batch_size or micro")
    if ref > gpu:
        fixes.append(f"reference pass: {_gib(ref)} > {_gib(gpu)}. Fix: a smaller --dpo.micro_batch_size")
    if max(host.values()) > P.host_gib * GiB:
        fixes.append(f"host RAM: {_gib(max(host.values()))} > {P.host_gib:g} GiB per node. Fix: fewer "
                     "GPUs per node, or a node with more RAM")

    # ---- tokens, FLOPs and time per stage, for one iteration (upper bounds: one pair per prompt)
    flops_s = P.peak_tflops * 1e12 * P.mfu * W
    gen_s = P.tokens_per_s_per_gpu * W
    seq = min(cfg.dpo.max_length, mean_prompt + new)
    total_s, disk_total = 0.0, 0
    out(f"\nper iteration (responses of {new:.0f} tokens on average; {P.tokens_per_s_per_gpu:g} tok/s/GPU "
        f"sampling, {P.peak_tflops:g} TFLOP/s × MFU {P.mfu:g} otherwise):")
    for t in range(1, cfg.iters + 1):
        D_t, D_ms, D_r = len(parts[f"D_{t}"]), len(parts["D_MS"]), len(parts.get("D_R", []))
        pairs = D_t
        steps = math.ceil(pairs / cfg.dpo.batch_size) * cfg.dpo.epochs
        ckpts = (steps // cfg.dpo.save_every if cfg.dpo.save_every else 0) + 1
        rm_pairs = (D_r if E.rm_data != "st" else 0) + (sum(len(parts[f"D_{k}"]) for k in range(1, t + 1))
                                                        if E.rm_data != "pc" else 0)
        rm_steps = math.ceil(rm_pairs / cfg.rm_train.batch_size) * cfg.rm_train.epochs
        rm_ckpts = (rm_steps // cfg.rm_train.save_every if cfg.rm_train.save_every else 0) + 1
        resp = {"sampling": D_t * E.n_samples, "selection": D_ms * (ckpts + 1),
                "pseudo-pairs": 2 * D_r if E.update_rm else 0}
        stages = [("sampling", resp["sampling"] * new, 0, "gen"),
                  ("scoring", resp["sampling"] * (mean_prompt + new), 2 * Nr, "fwd"),
                  ("reference pass", pairs * 2 * seq, 2 * Np, "fwd"),
                  ("DPO", pairs * 2 * seq * cfg.dpo.epochs, 6 * Np, "train"),
                  ("selection", resp["selection"] * new, 0, "gen"),
                  ("selection scoring", resp["selection"] * (mean_prompt + new), 2 * Nr, "fwd"),
                  ("pseudo-pairs", resp["pseudo-pairs"] * new, 0, "gen"),
                  ("pseudo scoring", resp["pseudo-pairs"] * (mean_prompt + new), 2 * Nr, "fwd"),
                  ("RM", rm_pairs * 2 * seq * cfg.rm_train.epochs if E.update_rm else 0, 6 * Nr, "train")]
        out(f"  iteration {t}: |D_t| {D_t} prompts, ≤{pairs} pairs, {steps} DPO steps, {ckpts} candidates; "
            f"|D_MS| {D_ms}; |D_R| {D_r}, ≤{rm_pairs} RM pairs, {rm_steps} RM steps")
        for name, tokens, per_token, how in stages:
            flops = tokens * per_token
            secs = tokens / gen_s if how == "gen" else flops / flops_s
            total_s += secs
            out(f"    {name:<18} {_count(tokens):>7} tokens {_count(flops) + 'FLOP' if flops else '':>10}  "
                f"{_hms(secs):>8}")
        disk = {"policy checkpoints (bf16)": ckpts * 2 * Np, "policy trainer_state (fp32 + 2 moments)": 12 * Np,
                "RM checkpoints (bf16)": rm_ckpts * 2 * Nr if E.update_rm else 0,
                "RM trainer_state": 12 * Nr if E.update_rm else 0,
                # samples/scores/pairs files: JSON text, about 4 bytes a token (an estimate)
                "data files (estimate)": int(4 * sum(resp.values()) * (mean_prompt + new) + 8 * pairs * seq)}
        disk_total += sum(disk.values())
        out("    disk: " + ", ".join(f"{k} {_gib(v)}" for k, v in disk.items() if v)
            + f"; per rank: trainer_state {_gib(12 * Np / W)}")
    out(f"total: {_hms(total_s)} on {W} GPUs, {_gib(disk_total)} of disk "
        f"(--em.keep_checkpoints selected deletes the unselected candidates)")

    # ---- verdict
    if not fixes:
        out("\nverdict: everything fits")
        return 0
    out("\nverdict: will NOT fit:")
    for f in fixes:
        out(f"  - {f}")
    return NOT_FIT


def _meta_params(mcfg: ModelConfig):
    with torch.device("meta"):
        return list(Transformer(mcfg).parameters())


def main(argv: list[str]) -> int:
    """`python run_em.py plan ...` after preflight (run_em.py): print the plan, return the exit status."""
    return plan(parse(argv))
