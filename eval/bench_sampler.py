r"""Tokens/s of our sampler vs transformers' generate() on the same random Llama, prompts and limits.

    python eval/bench_sampler.py                       # CPU defaults: 32 concurrent sequences
    python eval/bench_sampler.py --hidden 512 --layers 8 --vocab 32000 --repeats 1   # a bigger model
    python eval/bench_sampler.py --shape llama3-8b --device cuda --sampling.slots 128 --prompts 256 \
        --sampling.max_new_tokens 512
    python eval/bench_sampler.py --model DIR --n 1 --sampling.max_new_tokens 64 --sampling.slots 8

Response lengths vary the way real ones do: a set of stop ids, sized so a token is a stop id with
probability about 1/--mean_len, makes most responses end early and a few run to the cap.
generate() runs the jobs in batches of --sampling.slots rows (prompts x num_return_sequences); our
sampler keeps --sampling.slots sequences in flight and refills a slot as soon as its response ends.
Both sample with the same --sampling.* settings (temperature, top-p, top-k or greedy), in the same
dtype, in this one process; the best of --repeats runs is reported. --sampling.compile compiles our
decode step, one graph per shape bucket, all in a warm-up pass (the same jobs: the same buckets).

--model DIR benchmarks a real chat model instead (a Hugging Face directory: its weights, its
tokenizer's chat template and its stop ids from generation_config.json): the first --prompts of
the 32 built-in CHAT_PROMPTS as user turns, --n responses each, the same stop ids for both sides
(--fixed_length: none, every response runs to the cap). --variants also times our sampler with a
feature switched off (refill at once instead of in groups, no shared-prefix prefill), same run.

--kv_bytes runs our sampler once with the paged KV cache and reports the K/V bytes its rows held at
the pass's peak against what the dense cache allocates for --sampling.slots rows at the caps
(--sampling.max_prompt_tokens + --sampling.max_new_tokens), and how many rows of the pass's mean
length the dense bytes would hold.

--before DIR also times the sampler of another checkout of this repository (its mt/, e.g. the code
before a change) on the same model and prompts, in this process. --sweep times our sampler (and
--before's) at fixed response lengths, --sweep_slots x --sweep_lengths, each point `slots`
responses of exactly that many tokens (no stop ids), instead of the comparison with generate().
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mt import chat, dist, sampler  # noqa: E402
from mt.checkpoint import load_model, resolve_dtype  # noqa: E402
from mt.config import SamplingConfig  # noqa: E402
from mt.flags import ConfigError, opt, parse  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402
from mt.sampler import check_sampling, generate  # noqa: E402


# Llama-3-8B's shape (random weights): the paper's policy, for the GPU figure
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)

# --model: short, varied user turns, as a chat policy gets them
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for sleeping better.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Suggest a name for a coffee shop run by cats.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a virus and a bacterium?",
    "Write a short, polite email declining a meeting invitation.",
    "Why is the sky blue?",
    "List five healthy breakfast ideas.",
    "How many legs does a spider have?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is a prime number? Give two examples.",
    "Tell me a joke about computers.",
    "How do vaccines work?",
    "Describe the water cycle in a few sentences.",
    "What should I pack for a weekend camping trip?",
    "Explain what a black hole is.",
    "Write a limerick about a forgetful wizard.",
    "What is 17 times 23?",
    "Give me a simple recipe for pancakes.",
    "What are the three states of matter?",
    "How can I improve my public speaking?",
    "Who wrote 'Pride and Prejudice'?",
    "Explain the rules of chess in brief.",
    "What is machine learning, in one paragraph?",
    "Write a motivational sentence for someone starting a new job.",
    "Why do cats purr?",
    "What is the boiling point of water at sea level?",
    "Recommend a good habit to learn this year and explain why.",
]



@dataclass
class BenchSamplerArgs:
    """python eval/bench_sampler.py: our sampler vs transformers' generate()."""
    shape: str = opt("custom", choices=("custom", "llama3-8b"))  # custom: --hidden/--layers/--vocab; llama3-8b: the paper's policy
    device: str = "cpu"  # cpu | cuda
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on cuda, else fp32
    hidden: int = opt(384, above=0)  # custom shape: hidden size (heads of 64)
    layers: int = opt(6, above=0)  # custom shape
    vocab: int = opt(16000, above=1)  # custom shape
    prompts: int = opt(64, above=0)  # random prompts of 16-128 tokens
    n: int = opt(2, above=0)  # responses per prompt
    mean_len: float = opt(48.0, above=0)  # 1 / per-token stop probability
    repeats: int = opt(2, above=0)
    threads: int = opt(0, min=0)  # torch threads (0 = torch's default)
    seed: int = 0
    model: str = ""  # a Hugging Face chat model directory instead of the random model (see above)
    fixed_length: bool = False  # --model: no stop ids, every response runs to max_new_tokens
    variants: bool = False  # also time our sampler with grouped refill / shared prefix off
    before: str = ""  # another checkout of this repository, whose sampler (mt/) is timed too
    sweep: bool = False  # tokens/s at fixed lengths over slots x lengths (see above)
    sweep_slots: str = "1,8,64"
    sweep_lengths: str = "32,128,512"
    kv_bytes: bool = False  # the paged cache's peak K/V bytes against the dense cache's (see above)
    # slots: concurrent sequences (generate(): rows per call); compile: our decode step only
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256, slots=32))


def build(a: BenchSamplerArgs, device: torch.device, dtype: torch.dtype):
    """transformers' Llama and ours with the same random weights, on `device` in `dtype`."""
    torch.manual_seed(a.seed)
    shape = LLAMA3_8B if a.shape == "llama3-8b" else dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
        num_key_value_heads=max(1, a.hidden // 128))
    hc = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
                     pad_token_id=0)
    with torch.device(device):  # 8B: 32 GB in fp32 for a moment, then 16 GB in bf16
        hf = LlamaForCausalLM(hc).to(dtype).eval()
    with torch.device("meta"):
        ours = Transformer(ModelConfig.from_hf(hc.to_dict()))
    ours.to(dtype).to_empty(device=device)  # as mt.checkpoint.load_model does
    ours.load_state_dict(hf.state_dict(), strict=False)
    return hf, ours.eval()


def load_chat(a: BenchSamplerArgs, device: torch.device, dtype: torch.dtype):
    """transformers' model and ours from --model, the chat prompts' ids, the model's stop ids."""
    hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(device).eval()
    ours = load_model(a.model, dtype=dtype, device=device).eval()
    tok = chat.load_tokenizer(a.model)
    prompts = [chat.encode_prompt(tok, [{"role": "user", "content": q}])
               for q in CHAT_PROMPTS[: a.prompts]]
    stops = [] if a.fixed_length else chat.stop_ids(tok, a.model)
    hf.generation_config.eos_token_id = stops or None  # generate() would add the file's otherwise
    return hf, ours, prompts, stops


def load_before(root: str, ours: Transformer):
    """`root`'s mt package imported beside ours (its modules under their own names, ours restored),
    and its Transformer with our weights: (its generate, its SamplingConfig, its model)."""
    mine = {k: m for k, m in sys.modules.items() if k == "mt" or k.startswith("mt.")}
    for k in mine:
        del sys.modules[k]
    sys.path.insert(0, os.path.abspath(root))
    try:
        # the other checkout's modules, loaded by name from its tree (not this file's imports)
        theirs = tuple(importlib.import_module(f"mt.{m}") for m in ("sampler", "config", "model"))
    finally:
        sys.path.pop(0)
        for k in [k for k in sys.modules if k == "mt" or k.startswith("mt.")]:
            del sys.modules[k]
        sys.modules.update(mine)
    smp, cfg_mod, model_mod = theirs
    p = next(ours.parameters())
    with torch.device("meta"):
        model = model_mod.Transformer(model_mod.ModelConfig.from_hf(ours.cfg.hf))
    model.to(p.dtype).to_empty(device=p.device)
    model.load_state_dict(ours.state_dict(), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return smp.generate, cfg_mod.SamplingConfig, model.eval()


def run_before(before, prompts, stops, cfg: SamplingConfig, n: int, device):
    their_generate, their_config, model = before
    names = {f.name for f in dataclasses.fields(their_config)}
    theirs = their_config(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        done = their_generate(model, prompts, theirs, stop_ids=stops, n=n)
    dt = time.perf_counter() - t0
    return dt, [c.num_tokens for cs in done for c in cs]


def sweep(a: BenchSamplerArgs, ours, prompts, before, device):
    """Tokens/s at fixed response lengths: slots responses of exactly `length` tokens per point."""
    slots = [int(x) for x in a.sweep_slots.split(",")]
    lengths = [int(x) for x in a.sweep_lengths.split(",")]
    rows = []
    for S in slots:
        for L in lengths:
            cfg = replace(a.sampling, slots=S, max_new_tokens=L)
            jobs = [prompts[i % len(prompts)] for i in range(S)]
            best = {}
            for _ in range(a.repeats):
                for name, fn, model in (("ours", run_ours, ours), ("before", run_before, before)):
                    if model is None:
                        continue
                    dt, got = fn(model, jobs, [], cfg, 1, device)
                    best[name] = max(best.get(name, 0.0), sum(got) / dt)
            rows.append((S, L, best))
            line = f"  slots {S:>3}, {L:>4} tokens: ours {best['ours']:7.1f} tokens/s"
            if "before" in best:
                line += f", before {best['before']:7.1f}, {best['ours'] / best['before']:.2f}x"
            print(line, flush=True)
    return rows


def kv_bytes(ours, prompts, stops, cfg: SamplingConfig, n: int, device) -> dict:
    """One paged pass: the K/V bytes its rows held at the peak vs the dense cache at the caps."""
    st = {}
    dt, lengths = run_ours(ours, prompts, stops, replace(cfg, kv_cache="paged"), n, device, st)
    pp, caps = st["bytes_per_position"], cfg.max_prompt_tokens + cfg.max_new_tokens
    dense = cfg.slots * caps * pp
    mean = sum(map(len, prompts)) / len(prompts) + sum(lengths) / len(lengths)
    st.update(dense_at_caps_bytes=dense, mean_positions=round(mean, 1),
              dense_rows_at_mean=int(dense // (mean * pp)))
    print(f"KV, {cfg.slots} rows, caps {cfg.max_prompt_tokens}+{cfg.max_new_tokens}, {len(lengths)} "
          f"responses ({describe(lengths, cfg.max_new_tokens)}; {dt:.0f}s): dense cache "
          f"{dense // pp:,} positions = {dense / 2**20:,.0f} MiB; paged, held at the peak "
          f"{st['peak_held_bytes'] // pp:,} positions = {st['peak_held_bytes'] / 2**20:,.0f} MiB "
          f"({dense / st['peak_held_bytes']:.1f}x less); the dense bytes hold "
          f"{st['dense_rows_at_mean']} rows of the mean length ({mean:.0f} positions), paged")
    return st


def stop_set(a: BenchSamplerArgs, ours, prompts, device) -> list[int]:
    """Stop ids whose total probability under the sampling distribution is about 1/mean_len per step."""
    temperature = a.sampling.temperature
    with torch.no_grad():  # the model's average next-token distribution at the prompts' ends
        p = torch.stack([torch.softmax(ours(torch.tensor([x], device=device))[0, -1].float() / temperature, -1)
                         for x in prompts]).mean(0).cpu()
    g = torch.Generator().manual_seed(a.seed + 1)
    ids, mass = [], 0.0
    for t in torch.randperm(ours.cfg.vocab_size, generator=g).tolist():
        if t == 0:
            continue  # the pad id
        ids.append(t)
        mass += p[t].item()
        if mass >= 1.0 / a.mean_len:
            break
    return ids


def run_ours(ours, prompts, stops, cfg: SamplingConfig, n: int, device, stats: dict | None = None):
    sync(device)
    t0 = time.perf_counter()
    done = generate(ours, prompts, cfg, stop_ids=stops, n=n, stats=stats)
    dt = time.perf_counter() - t0
    return dt, [c.num_tokens for cs in done for c in cs]


def run_hf(hf, prompts, stops, cfg: SamplingConfig, n: int, device):
    per_batch = cfg.slots // n  # prompts per generate() call, so each call holds --sampling.slots sequences
    # greedy: generate() takes no num_return_sequences > 1, so each prompt is repeated n times instead
    how = (dict(do_sample=False, num_return_sequences=1) if cfg.greedy else
           dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                num_return_sequences=n))
    lengths, stop = [], set(stops)
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, len(prompts), per_batch):
        batch = prompts[b: b + per_batch]
        if cfg.greedy:
            batch = [x for x in batch for _ in range(n)]
        T = max(map(len, batch))
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for r, x in enumerate(batch):  # left padding, as generate() wants for decoder-only models
            ids[r, T - len(x):], mask[r, T - len(x):] = torch.tensor(x), 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, **how, max_new_tokens=cfg.max_new_tokens,
                              eos_token_id=stops or None, pad_token_id=0)[:, T:].tolist()
        for row in out:  # a response ends at its first stop id (generate() pads finished rows)
            k = next((k for k, t in enumerate(row) if t in stop), None)
            lengths.append(len(row) if k is None else k + 1)
    dt = time.perf_counter() - t0
    return dt, lengths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def describe(lengths, cap):
    s = sorted(lengths)
    return (f"{len(s)} responses, mean {statistics.mean(s):.0f} tokens, median {statistics.median(s):.0f}, "
            f"p90 {s[int(0.9 * (len(s) - 1))]}, at the cap {sum(x >= cap for x in s)}")


def parse_args(argv=None) -> BenchSamplerArgs:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, BenchSamplerArgs(), "python eval/bench_sampler.py", __doc__)
    if a.sampling.slots % a.n:
        raise ConfigError(f"--sampling.slots={a.sampling.slots} must be a multiple of --n={a.n} "
                          "(generate() runs whole prompts)")
    check_sampling(a.sampling)
    return a


def main(argv=None):
    a = parse_args(argv)
    cfg = a.sampling
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype, device)

    if a.model:
        hf, ours, prompts, stops = load_chat(a, device, dtype)
        c = ours.cfg
        what = f"{a.model} ({c.model_type})"
        sizes = sorted(map(len, prompts))
        lengths = f"{len(prompts)} chat prompts of {sizes[0]}-{sizes[-1]} tokens"
        stopping = f"stop ids {stops}" if stops else "no stop ids (fixed length)"
    else:
        hf, ours = build(a, device, dtype)
        c = ours.cfg
        g = torch.Generator().manual_seed(a.seed)
        prompts = [torch.randint(1, c.vocab_size, (int(L),), generator=g).tolist()
                   for L in torch.randint(16, 129, (a.prompts,), generator=g)]
        stops = stop_set(a, ours, prompts, device)
        what = f"Llama ({a.shape})"
        lengths = f"{a.prompts} prompts of 16-128 tokens"
        stopping = f"{len(stops)} stop ids"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    decoding = "greedy" if cfg.greedy else f"T={cfg.temperature} top-p={cfg.top_p} top-k={cfg.top_k}"
    print(f"model: {what} hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"vocab {c.vocab_size} "
          f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params), {str(dtype)[6:]}, {where}; "
          f"{lengths} x {a.n} responses, {cfg.slots} concurrent, max "
          f"{cfg.max_new_tokens} new tokens, {decoding}, {stopping}, decode step "
          f"{'compiled' if cfg.compile else 'eager'}")

    before = load_before(a.before, ours) if a.before else None
    # warm up both paths (allocator, kernels) on a small job
    warm = replace(cfg, max_new_tokens=8)
    run_ours(ours, prompts[:4], stops, warm, a.n, device)
    if before:
        run_before(before, prompts[:4], stops, warm, a.n, device)
    if a.sweep:
        print(f"sweep: fixed lengths, no stop ids{'; before: ' + a.before if before else ''}")
        return sweep(a, ours, prompts, before, device)
    if a.kv_bytes:
        return kv_bytes(ours, prompts, stops, cfg, a.n, device)
    if cfg.compile:  # a whole pass: the graphs of every bucket the timed passes meet
        run_ours(ours, prompts, stops, cfg, a.n, device)
    run_hf(hf, prompts[: cfg.slots // a.n], stops, warm, a.n, device)
    runs = [("generate()", run_hf, hf, {}), ("ours", run_ours, ours, {})]
    if before:
        runs.append((f"before ({a.before})", run_before, before, {}))
    if a.variants:  # the same engine with one feature switched off
        runs += [("ours, refill at once", run_ours, ours, dict(REFILL_GROUP=0, REFILL_WAIT=0)),
                 ("ours, no shared prefix", run_ours, ours, dict(SHARE_PREFIX=False))]
    best = {}
    for r in range(a.repeats):
        for name, fn, model, switch in runs:
            saved = {k: getattr(sampler, k) for k in switch}
            for k, v in switch.items():
                setattr(sampler, k, v)
            try:
                dt, lengths = fn(model, prompts, stops, cfg, a.n, device)
            finally:
                for k, v in saved.items():
                    setattr(sampler, k, v)
            tps = sum(lengths) / dt
            print(f"  run {r + 1} {name:>22}: {sum(lengths)} tokens in {dt:.1f}s = "
                  f"{tps:.0f} tokens/s; "
                  f"{describe(lengths, cfg.max_new_tokens)}")
            best[name] = max(best.get(name, 0.0), tps)
    ratio = best["ours"] / best["generate()"]
    print(f"best tokens/s: ours {best['ours']:.0f}, generate() {best['generate()']:.0f}, ratio {ratio:.2f}x")
    for name in best:
        if name.startswith(("ours, ", "before")):
            print(f"  {name}: {best[name]:.0f} tokens/s; ours is {best['ours'] / best[name]:.2f}x "
                  "that")
    return ratio


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
