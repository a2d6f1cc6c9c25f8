"""Training speed: tokens/s and model-FLOPs utilisation (MFU) of a DPO step and an RM (Bradley-Terry) step.

    python eval/bench_train.py                                   # small Llama on this CPU
    python eval/bench_train.py --model llama-3.2-1b --seq 2048 --micro 2 --batch 16 --device cuda
    python eval/bench_train.py --objective dpo --vocab 128256 --seq 1024 --head both  # memory
    python eval/bench_train.py --objective all --lengths ultrafeedback --layout both --repeats 3
    python eval/bench_train.py --objective padding --lengths ultrafeedback --seq 2048 --batch 128

--layout both times packed micro-batches (mt/packing.py) and padded ones (the reference) in this
process, interleaved round by round on the same data and fresh models, and reports the ratio of
their tokens/s (real tokens: the same count for both) and each layout's padding fraction.
--lengths ultrafeedback draws pair lengths from an UltraFeedback-like spread (SPREAD below: an
assumption stated in numbers, not a fit to the data set), scaled so its 2,048-token cap is --seq;
`--objective score` times the scoring forward (mt/scoring.py score_token_rows) on the same
sequences, and `transformers`' LlamaForSequenceClassification on them in length-sorted batches.

Runs the real loop (mt/train.py: FSDP2 and bf16 on GPU, fp32 on CPU) on random weights and random tokens and
times the optimizer steps after the first (warm-up). FLOPs follow the 6·N·tokens convention: N = parameters
that take part in matmuls (everything but the input embedding lookup; the LM head counts), tokens = real
(unpadded) tokens through the trained model, forward + backward; attention's T² score FLOPs are not counted,
so MFU is slightly understated at long sequence lengths. DPO's reference log-probs are precomputed (not
timed), as in training. Peak: --peak-tflops, else bf16 dense H100 SXM (989) on CUDA, or a measured fp32
matmul rate on CPU (say so when you report it).

--head picks how DPO's log-probs are computed: `fused` (mt/logps.py response_logps: the LM head
fused with the log-softmax at response positions, no (2b, T, V) logits), `full` (the full logits,
the path it replaced), or `both`: each on a fresh model in this process, then the ratios (the
FLOP count stays 6·N·tokens for both: the fused head does 4 head matmuls on the response
positions where the full one does 3 on every position). Step
memory is the peak above the start of the training call: CUDA's allocator peak on a GPU; on the
CPU the resident set, sampled every millisecond by a thread. --vocab overrides the shape's
vocabulary (e.g. Llama-3's 128256 on the small shape).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_policy  # noqa: E402
from mt import dist  # noqa: E402
from mt import train as T  # noqa: E402
from mt.chat import Example  # noqa: E402
from mt.config import DPOConfig, RMConfig  # noqa: E402
from mt.data import pad_sequences  # noqa: E402
from mt.flags import opt, parse  # noqa: E402
from mt.losses import BRADLEY_TERRY, preference_objective  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402
from mt.packing import Packing  # noqa: E402
from mt.scoring import score_token_rows  # noqa: E402

SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_theta=500000.0),
}
H100_BF16_TFLOPS = 989.4  # dense, SXM


@dataclass
class BenchTrainArgs:
    """python eval/bench_train.py: tokens/s and MFU of DPO and RM training steps."""
    model: str = opt("small", choices=tuple(sorted(SHAPES)))  # the shape, random weights
    seq: int = opt(256, above=0)  # tokens per sequence (chosen and rejected each)
    micro: int = opt(2, above=0)  # pairs per forward
    batch: int = opt(4, above=0)  # pairs per optimizer step (global)
    steps: int = opt(4, above=0)  # timed steps (after one warm-up step)
    # both: dpo, rm; padding: only the layouts' padding (no model, nothing timed)
    objective: str = opt("both", choices=("dpo", "rm", "score", "both", "all", "padding"))
    layout: str = opt("packed", choices=("packed", "padded", "both"))  # both: interleaved, ratios
    lengths: str = opt("fixed", choices=("fixed", "ultrafeedback"))  # fixed: every sequence --seq
    repeats: int = opt(1, above=0)  # rounds of the interleaved layouts (--layout both)
    score_tokens: int = opt(8192, above=0)  # scoring: tokens per forward (max_tokens)
    ac: bool = False  # activation checkpointing
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    vocab: int = opt(0, min=0)  # 0 = the shape's vocabulary; else this one (e.g. 128256)
    # DPO log-probs: fused head (response positions), full (2b, T, V) logits, or both and ratios
    head: str = opt("fused", choices=("fused", "full", "both"))
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu | cuda
    threads: int = opt(0, min=0)  # CPU threads (0 = torch's default)
    peak_tflops: float = opt(0.0, min=0)  # 0 = H100 bf16 dense on CUDA, a measured matmul rate on CPU


def matmul_params(model: Transformer) -> int:
    """N of 6·N·tokens: all parameters but the embedding lookup (a tied LM head still does its matmul)."""
    n = model.num_params(non_embedding=True)
    if model.cfg.head == "lm":
        n += model.cfg.vocab_size * model.cfg.hidden_size if model.cfg.tie_word_embeddings else 0
    return n


def measured_cpu_peak_tflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


class StepMemory:
    """Peak memory of a `with` block above its start, in bytes (`.peak`): CUDA's allocator peak on
    a GPU; on the CPU the resident set (/proc/self/statm), sampled every millisecond by a thread,
    after glibc's malloc_trim has handed back what earlier runs freed (large tensors are mmap'd and
    returned on free anyway), so RSS follows what this block holds live."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: earlier runs' freed heap may hide growth
            pass
        self.start, self.high, self.stop = self.rss(), 0, threading.Event()

        def sample():
            while not self.stop.is_set():
                self.high = max(self.high, self.rss())
                time.sleep(0.001)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.high, self.rss()) - self.start
        return False


def examples(n_pairs: int, seq: int, vocab: int, seed: int = 0) -> list[Example]:
    """Pairs whose chosen and rejected are both `seq` tokens (a quarter prompt): no padding."""
    g = torch.Generator().manual_seed(seed)
    p = seq // 4
    out = []
    for i in range(n_pairs):
        ids = torch.randint(0, vocab, (2 * seq - p,), generator=g).tolist()
        out.append(Example(f"k{i}", f"p{i}", tuple(ids[:seq]), p, tuple(ids[:p] + ids[seq:]), p))
    return out


# UltraFeedback-like lengths, in Llama-3 tokens before scaling: log-normal prompt and responses
# (chosen and rejected drawn independently) with these medians and log-spreads, each clipped to
# [min, the 2,048-token training cap]; a pair over the cap is redrawn (training drops it). An
# assumption that gives UltraFeedback's shape (tens to thousands of tokens, long right tail),
# not a fit: say so beside any figure it produces.
SPREAD = {"prompt": (100, 0.9), "response": (250, 0.8), "min": 8, "cap": 2048}


def spread_examples(n_pairs: int, seq: int, vocab: int, seed: int = 0) -> list[Example]:
    """Pairs with SPREAD's lengths scaled by seq / 2048 (prompt shared by chosen and rejected)."""
    g = torch.Generator().manual_seed(seed)
    scale = seq / SPREAD["cap"]

    def draw(median, sigma):
        x = median * float(torch.exp(sigma * torch.randn((), generator=g, dtype=torch.float64)))
        return max(1, round(max(SPREAD["min"], x) * scale))
    out = []
    while len(out) < n_pairs:
        p, c, r = draw(*SPREAD["prompt"]), draw(*SPREAD["response"]), draw(*SPREAD["response"])
        if p + max(c, r) > seq:
            continue
        ids = torch.randint(0, vocab, (p + c + r,), generator=g).tolist()
        i = len(out)
        out.append(Example(f"k{i}", f"p{i}", tuple(ids[:p + c]), p, tuple(ids[:p] + ids[p + c:]), p))
    return out


def _model(a, head: str) -> tuple[Transformer, dict]:
    shape = {"model_type": "llama", "max_position_embeddings": max(4096, a.seq), **SHAPES[a.model]}
    if a.vocab:
        shape["vocab_size"] = a.vocab
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(shape, head=head))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    return model, shape


def _data(a, n_pairs: int, vocab: int) -> list[Example]:
    return (spread_examples if a.lengths == "ultrafeedback" else examples)(n_pairs, a.seq, vocab)


@torch.no_grad()
def bench_score(a, device: torch.device, packing: bool) -> dict:
    """The scoring forward (mt/scoring.py score_token_rows) over the chosen and rejected sequences
    of the benchmark's pairs, once as warm-up, then timed."""
    model, shape = _model(a, "score")
    model = model.to(device, dist.resolve_dtype(a.dtype, device)).eval()
    ex = _data(a, a.batch * a.steps, shape["vocab_size"])
    seqs = [list(e.chosen) for e in ex] + [list(e.rejected) for e in ex]
    tokens = sum(map(len, seqs))
    score_token_rows(model, seqs[:8], 0, 64, a.score_tokens, packing)
    slots = []

    def done(n):  # padded: a right-padded batch of the n longest remaining
        slots.append(n)
    t0 = time.perf_counter()
    out = score_token_rows(model, seqs, 0, 64, a.score_tokens, packing, done)
    torch.cat([s for _, s in out]).tolist()  # host sync: the forwards are done
    seconds = time.perf_counter() - t0
    computed = sum(len(idx) * max(len(seqs[i]) for i in idx) for idx, _ in out)
    if packing:  # rows of the longest document in each batch: count them as pack() lays them
        lay = Packing([Example("", "", tuple(x), len(x)) for x in seqs], False, False, 1,
                      a.score_tokens)
        computed = sum(lay.batch([Example("", "", tuple(seqs[i]), len(seqs[i])) for i in idx]).slots
                       for idx, _ in out)
    return {"objective": "score", "layout": "packed" if packing else "padded", "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "pad_fraction": 1 - tokens / computed}


@torch.no_grad()
def bench_score_transformers(a, device: torch.device) -> dict:
    """The same sequences and weights through `transformers`' LlamaForSequenceClassification (SDPA
    attention), in length-sorted right-padded batches as the padded scoring path forms them: the
    plain batched forward a user would otherwise write. Timing only (random token ids may equal the
    pad id, where transformers' pooling would read another position)."""
    model, shape = _model(a, "score")
    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"}, num_labels=1,
                      pad_token_id=0, attn_implementation="sdpa")
    hf = LlamaForSequenceClassification(cfg)
    hf.load_state_dict(model.state_dict())  # Hugging Face names (mt/model.py): no key map
    hf = hf.to(device, dist.resolve_dtype(a.dtype, device)).eval()
    ex = _data(a, a.batch * a.steps, shape["vocab_size"])
    seqs = sorted([list(e.chosen) for e in ex] + [list(e.rejected) for e in ex], key=lambda x: -len(x))
    tokens = sum(map(len, seqs))

    def run(rows):
        out, j = [], 0
        while j < len(rows):
            n = max(1, min(64, a.score_tokens // len(rows[j]), len(rows) - j))
            ids, lengths = pad_sequences(rows[j:j + n], 0)
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
            out.append(hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits)
            j += n
        return torch.cat(out).tolist()  # host sync: the forwards are done
    run(seqs[:8])  # warm-up
    t0 = time.perf_counter()
    run(seqs)
    seconds = time.perf_counter() - t0
    return {"objective": "score", "layout": "transformers", "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "pad_fraction": float("nan")}


def bench(objective: str, a, device: torch.device, peak_tflops: float,
          full_logits: bool = False, packing: bool = True) -> dict:
    """One training run on a fresh random model; DPO's log-probs through the fused head, or the
    full (2b, T, V) logits with `full_logits`."""
    model, shape = _model(a, "score" if objective == "rm" else "lm")
    n_matmul = matmul_params(model)
    steps = a.steps + 1
    ex = _data(a, a.batch * steps, shape["vocab_size"])
    kw = dict(lr=1e-6, batch_size=a.batch, micro_batch_size=a.micro, save_every=0, warmup_ratio=0.0,
              activation_checkpointing=a.ac, dtype=a.dtype, max_length=a.seq, packing=packing)
    cfg = DPOConfig(beta=0.1, **kw) if objective == "dpo" else RMConfig(**kw)
    model = dist.prepare_model(model, cfg, device)
    refs = (train_policy.reference_logps(model, ex, a.micro, progress=False,
                                         full_logits=full_logits, packing=packing)
            if objective == "dpo" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        obj = preference_objective("dpo", full_logits) if objective == "dpo" else BRADLEY_TERRY
        with StepMemory(device) as mem:
            T.train(model, ex, obj, cfg, out, ref_logps=refs, progress=False,
                    save_dtype=torch.bfloat16)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # step 1 is warm-up (allocator, kernels, lazy init)
    seconds = timed[-1]["elapsed"] - rows[0]["elapsed"]
    tokens = sum(r["tokens"] for r in timed)
    flops = 6 * n_matmul * tokens
    r = {"objective": objective, "layout": "packed" if packing else "padded",
         "pad_fraction": sum(x["pad_fraction"] for x in timed) / len(timed),
         "model": a.model, "vocab": shape["vocab_size"],
         "head": ("full" if full_logits else "fused") if objective == "dpo" else "score",
         "last_loss": rows[-1]["loss"], "step_memory_gib": mem.peak / 2**30,
         "N_matmul": n_matmul, "seq": a.seq, "micro": a.micro,
         "batch_pairs": a.batch, "tokens_per_step": timed[0]["tokens"], "steps_timed": len(timed),
         "seconds_per_step": seconds / len(timed), "tokens_per_s": tokens / seconds,
         "achieved_tflops": flops / seconds / 1e12, "peak_tflops": peak_tflops,
         "mfu": flops / seconds / 1e12 / peak_tflops}
    if device.type == "cuda":
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        r["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return r


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, BenchTrainArgs(), "python eval/bench_train.py", __doc__)
    if a.threads:
        torch.set_num_threads(a.threads)
    d = dist.init_distributed(None if a.device == "auto" else a.device)
    device = d.device
    peak, how = a.peak_tflops, "given"
    if not peak:
        peak, how = ((H100_BF16_TFLOPS, "H100 SXM bf16 dense") if device.type == "cuda"
                     else (measured_cpu_peak_tflops(), "measured fp32 1024³ matmul on this CPU"))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    dist.print0(f"device {device} ({where}), peak {peak:.3f} TFLOP/s ({how}); "
                f"command: python eval/bench_train.py {' '.join(argv)}")
    if a.objective == "padding":
        return padding_report(a)
    if a.layout == "both" or a.objective in ("score", "all"):
        return compare_layouts(a, device, peak)
    results = []
    heads = ("fused", "full") if a.head == "both" else (a.head,)
    runs = [(obj, h) for obj in (("dpo", "rm") if a.objective == "both" else (a.objective,))
            for h in (heads if obj == "dpo" else ("score",))]
    for obj, h in runs:
        r = bench(obj, a, device, peak, full_logits=h == "full", packing=a.layout == "packed")
        results.append(r)
        mem = (f"{r['peak_memory_gib']:.1f} GiB peak" if "peak_memory_gib" in r
               else f"{r['max_rss_gib']:.2f} GiB max RSS")
        name = f"{obj} ({h} head)" if obj == "dpo" else obj
        dist.print0(f"{name:>3}: {r['tokens_per_s']:,.0f} tokens/s, "
                    f"{r['seconds_per_step']:.3f} s/step ({r['tokens_per_step']} tokens), "
                    f"{r['achieved_tflops']:.4f} TFLOP/s, "
                    f"MFU {100 * r['mfu']:.1f}% (6·N·tokens, N={r['N_matmul'] / 1e6:.1f}M), "
                    f"step memory {r['step_memory_gib']:.3f} GiB, {mem}")
    pair = {r["head"]: r for r in results if r["objective"] == "dpo"}
    if len(pair) == 2:
        fu, fl = pair["fused"], pair["full"]
        dist.print0(f"dpo, full logits -> fused head (vocab {fu['vocab']:,}, seq {a.seq}): "
                    f"step memory {fl['step_memory_gib']:.3f} -> {fu['step_memory_gib']:.3f} "
                    f"GiB = "
                    f"{fl['step_memory_gib'] / fu['step_memory_gib']:.2f}x lower; tokens/s "
                    f"{fl['tokens_per_s']:,.0f} -> {fu['tokens_per_s']:,.0f} = "
                    f"{fu['tokens_per_s'] / fl['tokens_per_s']:.2f}x; last-step loss "
                    f"{fl['last_loss']:.6f} vs {fu['last_loss']:.6f}")
    return results


def padding_report(a) -> dict:
    """Positions computed and the padding among them, padded vs packed, for the training steps
    (pairs, a rank's micro-batches as mt/train.py forms them) and for scoring (the sequences), on
    --steps global batches of the benchmark's pairs: host-side layouts only."""
    ex = _data(a, a.batch * a.steps, SHAPES[a.model]["vocab_size"])
    seqs = [Example("", "", e.chosen, len(e.chosen)) for e in ex] + [
        Example("", "", e.rejected, len(e.rejected)) for e in ex]
    stages = {
        "training": (ex, T.Padded(ex, True, a.micro), Packing(ex, True, True, a.micro), a.batch),
        "scoring": (seqs, None, Packing(seqs, False, False, 1, a.score_tokens), len(seqs))}
    out = {}
    for stage, (items, padded, packed, batch) in stages.items():
        for name, layout in (("padded", padded), ("packed", packed)):
            slots = tokens = 0
            for s in range(0, len(items), batch):
                idx = list(range(s, min(s + batch, len(items))))
                if layout is None:  # scoring's padded batches: mt/scoring.py score_token_rows
                    order = sorted(idx, key=lambda i: -len(items[i].chosen))
                    j = 0
                    while j < len(order):
                        T_ = len(items[order[j]].chosen)
                        n = max(1, min(64, a.score_tokens // T_, len(order) - j))
                        slots += n * T_
                        tokens += sum(len(items[i].chosen) for i in order[j:j + n])
                        j += n
                    continue
                for m in layout.micro(idx, 0, 1):
                    b = layout.batch([items[i] for i in m])
                    slots, tokens = slots + b.slots, tokens + int(b.tokens)
            out[stage, name] = (slots, 1 - tokens / slots)
        (ps, pf), (qs, qf) = out[stage, "padded"], out[stage, "packed"]
        dist.print0(f"{stage} ({a.lengths} lengths, seq {a.seq}, batch {batch}, micro {a.micro}): "
                    f"positions computed {ps:,} padded -> {qs:,} packed ({ps / qs:.2f}x fewer); "
                    f"padding {100 * pf:.1f}% -> {100 * qf:.1f}%")
    return out


def compare_layouts(a, device: torch.device, peak: float) -> list[dict]:
    """Each objective in each layout, interleaved round by round (a loaded machine slows both
    alike); per objective the median over rounds of packed tokens/s over padded tokens/s."""
    objectives = {"both": ("dpo", "rm"), "all": ("dpo", "rm", "score")}.get(a.objective,
                                                                            (a.objective,))
    layouts = {"both": (False, True), "packed": (True,), "padded": (False,)}[a.layout]
    results = []
    for rnd in range(a.repeats):
        for obj in objectives:
            runs = [lambda p=p: (bench_score(a, device, p) if obj == "score"
                                 else bench(obj, a, device, peak, packing=p)) for p in layouts]
            if obj == "score":  # and the plain transformers forward, length-sorted
                runs.append(lambda: bench_score_transformers(a, device))
            for run in runs:
                r = run()
                r["round"] = rnd
                results.append(r)
                dist.print0(f"round {rnd} {obj:>5} {r['layout']:>12}: {r['tokens_per_s']:,.0f} "
                            f"tokens/s, padding {100 * r['pad_fraction']:.1f}%")
    for obj in objectives:
        by = {(r["round"], r["layout"]): r for r in results if r["objective"] == obj}
        ratios = sorted(by[k, "packed"]["tokens_per_s"] / by[k, "padded"]["tokens_per_s"]
                        for k in range(a.repeats) if (k, "packed") in by and (k, "padded") in by)
        pads = {lay: sum(r["pad_fraction"] for (_, l), r in by.items() if l == lay) / a.repeats
                for lay in ("padded", "packed") if any(l == lay for _, l in by)}
        line = ", ".join(f"{lay} padding {100 * v:.1f}%" for lay, v in pads.items())
        if ratios:
            line += (f"; packed / padded tokens/s: median {ratios[len(ratios) // 2]:.2f}x "
                     f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        hf = sorted(by[k, "packed"]["tokens_per_s"] / by[k, "transformers"]["tokens_per_s"]
                    for k in range(a.repeats) if (k, "packed") in by and (k, "transformers") in by)
        if hf:
            line += (f"; packed / transformers (length-sorted) tokens/s: median "
                     f"{hf[len(hf) // 2]:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in hf)})")
        dist.print0(f"{obj} ({a.lengths} lengths, seq {a.seq}, micro {a.micro}): {line}")
    return results


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
