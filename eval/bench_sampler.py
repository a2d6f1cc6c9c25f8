"""Tokens/s of our sampler vs transformers' generate() on the same random Llama, prompts and limits.

    python eval/bench_sampler.py                       # CPU defaults: 32 concurrent sequences
    python eval/bench_sampler.py --hidden 512 --layers 8 --vocab 32000 --repeats 1   # a bigger model
    python eval/bench_sampler.py --shape llama3-8b --device cuda --slots 128 --prompts 256 --max-new-tokens 512

Response lengths vary the way real ones do: a set of stop ids, sized so a token is a stop id with
probability about 1/--mean-len, makes most responses end early and a few run to the cap.
generate() runs the jobs in batches of --slots rows (prompts x num_return_sequences); our sampler keeps
--slots sequences in flight and refills a slot as soon as its response ends. Both sample at the same
temperature / top-p, in the same dtype, in this one process; the best of --repeats runs is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mt.checkpoint import resolve_dtype  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402
from mt.sampler import SamplingConfig, generate  # noqa: E402


# Llama-3-8B's shape (random weights): the paper's policy, for the GPU figure
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


def build(a):
    """transformers' Llama and ours with the same random weights, on --device in --dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(a.seed)
    shape = LLAMA3_8B if a.shape == "llama3-8b" else dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 128))
    a.vocab = shape["vocab_size"]
    hc = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(a.device):  # 8B: 32 GB in fp32 for a moment, then 16 GB in bf16
        hf = LlamaForCausalLM(hc).to(a.torch_dtype).eval()
    with torch.device("meta"):
        ours = Transformer(ModelConfig.from_hf(hc.to_dict()))
    ours.to(a.torch_dtype).to_empty(device=a.device)  # as mt.checkpoint.load_model does
    ours.load_state_dict(hf.state_dict(), strict=False)
    return hf, ours.eval()


def stop_set(a, ours, prompts) -> list[int]:
    """Stop ids whose total probability under the sampling distribution is about 1/mean_len per step."""
    with torch.no_grad():  # the model's average next-token distribution at the prompts' ends
        p = torch.stack([torch.softmax(ours(torch.tensor([x], device=a.device))[0, -1].float() / a.temperature, -1)
                         for x in prompts]).mean(0).cpu()
    g = torch.Generator().manual_seed(a.seed + 1)
    ids, mass = [], 0.0
    for t in torch.randperm(a.vocab, generator=g).tolist():
        if t == 0:
            continue  # the pad id
        ids.append(t)
        mass += p[t].item()
        if mass >= 1.0 / a.mean_len:
            break
    return ids


def run_ours(a, ours, prompts, stops):
    cfg = SamplingConfig(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, slots=a.slots,
                         compile=a.compile)
    sync(a)
    t0 = time.perf_counter()
    done = generate(ours, prompts, cfg, stop_ids=stops, n=a.n)
    dt = time.perf_counter() - t0
    return dt, [c.num_tokens for cs in done for c in cs]


def run_hf(a, hf, prompts, stops):
    per_batch = a.slots // a.n  # prompts per generate() call, so each call holds --slots sequences
    lengths, stop = [], set(stops)
    sync(a)
    t0 = time.perf_counter()
    for b in range(0, len(prompts), per_batch):
        batch = prompts[b: b + per_batch]
        T = max(map(len, batch))
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for r, x in enumerate(batch):  # left padding, as generate() wants for decoder-only models
            ids[r, T - len(x):], mask[r, T - len(x):] = torch.tensor(x), 1
        ids, mask = ids.to(a.device), mask.to(a.device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=a.temperature, top_p=a.top_p,
                              top_k=0, max_new_tokens=a.max_new_tokens, num_return_sequences=a.n,
                              eos_token_id=stops, pad_token_id=0)[:, T:].tolist()
        for row in out:  # a response ends at its first stop id (generate() pads finished rows)
            k = next((k for k, t in enumerate(row) if t in stop), None)
            lengths.append(len(row) if k is None else k + 1)
    dt = time.perf_counter() - t0
    return dt, lengths


def sync(a):
    if a.device.type == "cuda":
        torch.cuda.synchronize()


def describe(lengths, cap):
    s = sorted(lengths)
    return (f"{len(s)} responses, mean {statistics.mean(s):.0f} tokens, median {statistics.median(s):.0f}, "
            f"p90 {s[int(0.9 * (len(s) - 1))]}, at the cap {sum(x >= cap for x in s)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("custom", "llama3-8b"), default="custom",
                    help="custom: --hidden/--layers/--vocab; llama3-8b: the paper's policy shape")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda, else fp32")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=2, help="responses per prompt")
    ap.add_argument("--slots", type=int, default=32, help="concurrent sequences (generate(): rows per call)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--mean-len", type=float, default=48.0, help="1 / per-token stop probability")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step (compiled in the warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.slots % a.n:
        ap.error("--slots must be a multiple of --n (generate() runs whole prompts)")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.device = torch.device(a.device)
    a.torch_dtype = resolve_dtype(a.dtype, a.device)

    hf, ours = build(a)
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(1, a.vocab, (int(L),), generator=g).tolist()
               for L in torch.randint(16, 129, (a.prompts,), generator=g)]
    stops = stop_set(a, ours, prompts)
    c = ours.cfg
    where = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"model: Llama ({a.shape}) hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {a.vocab} "
          f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params), {str(a.torch_dtype)[6:]}, {where}; "
          f"{a.prompts} prompts of 16-128 tokens x {a.n} responses, {a.slots} concurrent, max {a.max_new_tokens} new "
          f"tokens, T={a.temperature} top-p={a.top_p}, {len(stops)} stop ids, decode step "
          f"{'compiled' if a.compile else 'eager'}")

    # warm up both paths (allocator, kernels) on a small job
    run_ours(argparse.Namespace(**{**vars(a), "max_new_tokens": 8}), ours, prompts[:4], stops)
    if a.compile:  # the one-row graph too (a size of 1 is specialised), as the tail of a pass can reach it
        run_ours(argparse.Namespace(**{**vars(a), "max_new_tokens": 8, "n": 1}), ours, prompts[:1], stops)
    run_hf(argparse.Namespace(**{**vars(a), "max_new_tokens": 8}), hf, prompts[: a.slots // a.n], stops)
    best = {}
    for r in range(a.repeats):
        for name, fn, model in (("generate()", run_hf, hf), ("ours", run_ours, ours)):
            dt, lengths = fn(a, model, prompts, stops)
            tps = sum(lengths) / dt
            print(f"  run {r + 1} {name:>10}: {sum(lengths)} tokens in {dt:.1f}s = {tps:.0f} tokens/s; "
                  f"{describe(lengths, a.max_new_tokens)}")
            best[name] = max(best.get(name, 0.0), tps)
    ratio = best["ours"] / best["generate()"]
    print(f"best tokens/s: ours {best['ours']:.0f}, generate() {best['generate()']:.0f}, ratio {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
