r"""The prepared GPU check: one command, one GPU, under 8 minutes, the figures a CPU cannot give.

    python eval/gpu_check.py --out runs/gpu_check      # on a GPU: writes runs/gpu_check.{json,md}
    python eval/gpu_check.py --out /tmp/gc --device cpu   # shrunk sizes; CUDA-only parts skipped

Records, each with its peak GPU memory (torch's allocator peak, reset before each measurement):
  logits   bf16 logits of our model against transformers' on the same random weights, at the
           Llama-3.2-1B shape (llama3 rope scaling, tied head), right- and left-padded rows: ours
           vs theirs, and each against transformers in fp32 (bf16 is as accurate as theirs if the
           two errors match); ours vs theirs in fp32 too.
  dpo      DPO step tokens/s and MFU at the Llama-3.2-1B shape, sequence 2,048, 2 pairs per
           micro-batch, 16 per step (eval/bench_train.py's bench): the fused head and the full
           (2b, T, V) logits, so the memory ratio is measured on the GPU as well.
  sampler  our sampler against transformers' generate() at the Llama-3-8B shape (random bf16
           weights), 64 and 256 concurrent sequences, long-tailed lengths (eval/bench_sampler.py's
           build, stop set and runners: a stop set of ~1/48 per-token mass, at most 512 new tokens,
           2 responses per prompt, 2 x batch responses each), eager with the default KV cache
           (paged on CUDA: FlexAttention, compiled) and with the dense one; 128 rows at the
           paper's caps (2,048 + 4,096 positions a row: the paged pool takes the free memory, 128
           dense slots would not fit); then compiled (--sampling.compile, after an untimed
           warm-up pass that compiles every bucket it meets).
  sandbox  the default sandbox run, `python run_em.py --device cuda` (the gold table's tail).

On the CPU (the test suite runs it: tests/test_gpu_check.py) every size is shrunk so the whole
check takes seconds; the sandbox on CUDA and the compiled sampler are skipped there and the files
say so. Each part runs under a time limit (what is left of --budget_s, at most its own cap); a part
past it, or one that fails, is recorded as such and the next one runs. Both files are rewritten
after each part, so an interrupted check still leaves what it measured.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import bench_sampler as BS  # noqa: E402
from eval import bench_train as BT  # noqa: E402
from mt import dist  # noqa: E402
from mt.config import SamplingConfig  # noqa: E402
from mt.flags import ConfigError, opt, parse  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402

PARTS = ("logits", "dpo", "sampler", "sandbox")
LLAMA32_1B_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
# seconds each part may take at most on a GPU (also bounded by what is left of --budget_s)
CAPS = {"logits": 90, "dpo": 150, "sampler": 180, "sandbox": 150, "sampler_compiled": 240}


@dataclass
class GpuCheckArgs:
    """python eval/gpu_check.py: the prepared one-GPU check, recorded to OUT.json and OUT.md."""
    out: str = "runs/gpu_check"  # writes OUT.json and OUT.md
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))  # auto: cuda if available
    parts: str = ",".join(PARTS)  # comma-separated subset of logits,dpo,sampler,sandbox
    # full: the shapes above; small: shrunk (seconds on a CPU); auto: full on cuda, else small
    size: str = opt("auto", choices=("auto", "full", "small"))
    # the compiled sampler runs: auto = on cuda only (a CPU compile takes minutes)
    compile: str = opt("auto", choices=("auto", "on", "off"))
    budget_s: float = opt(450.0, above=0)  # the whole check's time limit (parts left are skipped)
    batches: str = ""  # sampler batches (concurrent sequences); "" = 64,256 full, 4,8 small
    threads: int = opt(0, min=0)  # CPU threads (0 = torch's default)


# ---- recording


class Record:
    """The check's results, rewritten to OUT.json and OUT.md after every part."""

    def __init__(self, a: GpuCheckArgs, argv: list[str], device: torch.device, size: str):
        self.path = Path(a.out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor())
        self.data = {"command": " ".join(["python eval/gpu_check.py", *argv]),
                     "device": f"{device.type} ({name or 'cpu'})", "size": size,
                     "torch": torch.__version__, "transformers": _version("transformers"),
                     "git": _git(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "seconds": 0.0, "budget_s": a.budget_s, "parts": {}}

    def put(self, name: str, entry: dict):
        self.data["parts"][name] = entry
        self.data["seconds"] = round(time.time() - self.t0, 1)
        self.write()

    def skip(self, name: str, reason: str):
        print(f"{name}: skipped: {reason}", flush=True)
        self.put(name, {"status": "skipped", "reason": reason})

    def write(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path.with_suffix(".json"))
        self.path.with_suffix(".md").write_text(markdown(self.data))


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except Exception:  # noqa: BLE001 - a version string is informative only
        return "?"


def _git() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


class PartTimeout(BaseException):
    """A part past its time limit (a BaseException: no `except Exception` in a part eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM; POSIX)."""
    def fire(signum, frame):
        raise PartTimeout(f"over its time limit of {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_part(rec: Record, name: str, fn, cap: float, deadline: float, need: float = 0.0):
    """fn() -> dict, under min(cap, time left); recorded as ok, failed or timed out."""
    left = deadline - time.time()
    if left < need:
        return rec.skip(name, f"time budget: {left:.0f} s left of --budget_s, this part needs "
                              f"~{need:.0f} s")
    t = time.time()
    print(f"{name}: running (limit {min(cap, left):.0f} s)", flush=True)
    try:
        with time_limit(min(cap, left)):
            result = fn()
        entry = {"status": "ok", **result}
    except PartTimeout as e:
        entry = {"status": "timed out", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
        entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-4000:]}
    entry["seconds"] = round(time.time() - t, 1)
    print(f"{name}: {entry['status']} in {entry['seconds']} s", flush=True)
    rec.put(name, entry)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


class Peak:
    """Peak GPU memory (GiB) of a block, from torch's allocator; None on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return False


# ---- the parts


def logits_part(device: torch.device, small: bool) -> dict:
    """Our bf16 logits against transformers' on the same random weights (Llama-3.2-1B shape)."""
    shape = dict(BT.SHAPES["llama-3.2-1b"])
    B, T = 4, 512
    if small:
        shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
        B, T = 2, 32
    shape.pop("rope_theta")
    hc = LlamaConfig(**shape, rope_parameters=LLAMA32_1B_ROPE, max_position_embeddings=131072,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with Peak(device) as peak:
        with torch.device(device):
            hf32 = LlamaForCausalLM(hc).eval()
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        ours = {}
        for dt in (torch.float32, torch.bfloat16):
            with torch.device("meta"):
                m = Transformer(ModelConfig.from_hf(hc.to_dict()))
            m.to(dt).to_empty(device=device)
            m.tie_weights()  # moving off the meta device unties the head
            m.load_state_dict(hf32.state_dict(), strict=False)
            ours[dt] = m.eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, shape["vocab_size"], (B, T), generator=g)
        lengths = torch.tensor([T, T // 2] * (B // 2))
        out = {}
        for side in ("right", "left"):
            pos = torch.arange(T)[None]
            am = ((pos < lengths[:, None]) if side == "right"
                  else (pos >= T - lengths[:, None])).long()
            x = (ids * am).to(device)
            am = am.to(device)
            positions = (am.cumsum(-1) - 1).clamp(min=0)
            real = am.bool()
            with torch.no_grad():
                ref = hf32(input_ids=x, attention_mask=am, position_ids=positions).logits[real]
                theirs = hf16(input_ids=x, attention_mask=am,
                              position_ids=positions).logits[real].float()
                o16 = ours[torch.bfloat16](x, attention_mask=am)[real].float()
                o32 = ours[torch.float32](x, attention_mask=am)[real]
            out[side] = {
                "ours_bf16_vs_transformers_bf16": _diff(o16, theirs),
                "ours_bf16_vs_transformers_fp32": _diff(o16, ref),
                "transformers_bf16_vs_transformers_fp32": _diff(theirs, ref),
                "ours_fp32_vs_transformers_fp32": _diff(o32, ref),
                "logit_scale_mean_abs": round(ref.abs().mean().item(), 4)}
    del hf32, hf16, ours
    return {"shape": {**shape, "rope": LLAMA32_1B_ROPE["rope_type"]}, "batch": [B, T],
            "rows": "lengths T and T/2 alternating", "results": out, "peak_gpu_gib": peak.gib}


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_abs": round(d.max().item(), 5), "mean_abs": round(d.mean().item(), 6),
            "top1_agree": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4)}


def dpo_part(device: torch.device, small: bool) -> dict:
    """eval/bench_train.py's DPO step: fused head, then the full logits, on fresh models."""
    if small:
        a = BT.BenchTrainArgs(model="small", vocab=1024, seq=64, micro=1, batch=2, steps=1,
                              objective="dpo")
    else:
        a = BT.BenchTrainArgs(model="llama-3.2-1b", seq=2048, micro=2, batch=16, steps=2,
                              objective="dpo")
    peak, how = ((BT.H100_BF16_TFLOPS, "H100/H200 SXM bf16 dense (989 TFLOP/s)")
                 if device.type == "cuda" else (BT.measured_cpu_peak_tflops(),
                                                "measured fp32 1024^3 matmul on this CPU"))
    runs = {}
    for head in ("fused", "full"):
        r = BT.bench("dpo", a, device, peak, full_logits=head == "full")
        runs[head] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    fu, fl = runs["fused"], runs["full"]
    return {"command": (f"python eval/bench_train.py --model {a.model} --seq {a.seq} --micro "
                        f"{a.micro} --batch {a.batch} --steps {a.steps} --objective dpo "
                        f"--head both" + (f" --vocab {a.vocab}" if a.vocab else "")),
            "peak": how, "runs": runs,
            "memory_ratio_full_over_fused": round(fl["step_memory_gib"]
                                                  / max(fu["step_memory_gib"], 1e-9), 2),
            "speed_ratio_fused_over_full": round(fu["tokens_per_s"] / fl["tokens_per_s"], 3)}


class Sampler:
    """eval/bench_sampler.py's random models, prompts and stop set, built once for every run."""

    def __init__(self, device: torch.device, small: bool, batches: list[int]):
        if small:
            self.a = BS.BenchSamplerArgs(shape="custom", hidden=64, layers=2, vocab=512,
                                         prompts=max(batches), n=2, mean_len=8.0, repeats=1,
                                         sampling=SamplingConfig(max_new_tokens=16, slots=4))
        else:
            self.a = BS.BenchSamplerArgs(shape="llama3-8b", device="cuda", dtype="bf16",
                                         prompts=max(batches), n=2, mean_len=48.0, repeats=1,
                                         sampling=SamplingConfig(max_new_tokens=512, slots=64))
        self.device, self.batches = device, batches
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.hf, self.ours = BS.build(self.a, device, dtype)
        self.weights_gib = (round(torch.cuda.memory_allocated() / 2**30, 2)
                            if device.type == "cuda" else None)
        c = self.ours.cfg
        g = torch.Generator().manual_seed(self.a.seed)
        self.prompts = [torch.randint(1, c.vocab_size, (int(L),), generator=g).tolist()
                        for L in torch.randint(16, 129, (self.a.prompts,), generator=g)]
        self.stops = BS.stop_set(self.a, self.ours, self.prompts, device)
        self.shape = {"hidden": c.hidden_size, "layers": c.num_hidden_layers,
                      "vocab": c.vocab_size, "dtype": str(dtype)[6:],
                      "params_M": round(sum(p.numel() for p in self.ours.parameters()) / 1e6, 1)}

    def run(self, batch: int, compiled: bool, kv_cache: str = "auto", paper_caps: bool = False) -> dict:
        a, n, dev = self.a, self.a.n, self.device
        cfg = replace(a.sampling, slots=batch, compile=compiled, kv_cache=kv_cache)
        if paper_caps:  # the paper's caps: what the cache is sized for, not what the rows use
            cfg = replace(cfg, max_prompt_tokens=SamplingConfig.max_prompt_tokens,
                          max_new_tokens=SamplingConfig.max_new_tokens)
        prompts = self.prompts[:batch]  # x n responses: 2 x batch jobs
        warm = replace(cfg, max_new_tokens=8)
        if compiled:  # an untimed full pass compiles every (rows, window) bucket it meets
            BS.run_ours(self.ours, prompts, self.stops, cfg, n, dev)
        else:
            BS.run_ours(self.ours, prompts[:4], self.stops, warm, n, dev)
        kv = {}
        with Peak(dev) as p_ours:
            dt, lengths = BS.run_ours(self.ours, prompts, self.stops, cfg, n, dev, kv)
        out = {"batch": batch, "decode": "compiled" if compiled else "eager", "kv_cache": kv_cache,
               "caps": [cfg.max_prompt_tokens, cfg.max_new_tokens],
               "responses": len(lengths), "lengths": BS.describe(lengths, cfg.max_new_tokens),
               "ours_tokens_per_s": round(sum(lengths) / dt, 1), "ours_seconds": round(dt, 2),
               "ours_peak_gpu_gib": p_ours.gib, "kv": kv}
        if not compiled and kv_cache == "auto" and not paper_caps:
            BS.run_hf(self.hf, prompts[:max(1, batch // n)], self.stops, warm, n, dev)
            with Peak(dev) as p_hf:
                dt_hf, lengths_hf = BS.run_hf(self.hf, prompts, self.stops, cfg, n, dev)
            out.update(generate_tokens_per_s=round(sum(lengths_hf) / dt_hf, 1),
                       generate_seconds=round(dt_hf, 2), generate_peak_gpu_gib=p_hf.gib,
                       generate_lengths=BS.describe(lengths_hf, cfg.max_new_tokens),
                       ratio=round(sum(lengths) / dt / (sum(lengths_hf) / dt_hf), 3))
        return out

    def describe(self) -> dict:
        s = self.a.sampling
        return {"shape": self.shape, "weights_gpu_gib": self.weights_gib,
                "prompts": "random, 16-128 tokens", "responses_per_prompt": self.a.n,
                "stop_ids": len(self.stops), "mean_len": self.a.mean_len,
                "max_new_tokens": s.max_new_tokens,
                "sampling": f"T={s.temperature} top-p={s.top_p} top-k={s.top_k}"}


def sandbox_part(out_dir: Path, timeout: float) -> dict:
    """`python run_em.py --device cuda` (the default sandbox run) in a child process."""
    cmd = [sys.executable, "run_em.py", "--device", "cuda", "--out", str(out_dir)]
    if out_dir.exists():  # this check's own earlier run: a rerun must not just resume it
        shutil.rmtree(out_dir)
    t = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                else (e.stdout or ""))
    (out_dir.parent / (out_dir.name + ".log")).write_text(text)
    summary = out_dir / "summary.json"
    res = {"command": "python run_em.py --device cuda --out " + str(out_dir), "rc": rc,
           "wall_s": round(time.time() - t, 1), "tail": text.splitlines()[-30:],
           "summary": json.loads(summary.read_text()) if summary.is_file() else None}
    if rc != 0:
        raise RuntimeError(f"run_em.py exited {rc}: " + " | ".join(text.splitlines()[-5:]))
    return res


# ---- Markdown


def _gib(x) -> str:
    return "n/a (CPU)" if x is None else f"{x} GiB"


def markdown(d: dict) -> str:
    P = d["parts"]
    L = [f"# GPU check: {d['device']}", "",
         f"`{d['command']}` (sizes: {d['size']}); torch {d['torch']}, transformers "
         f"{d['transformers']}, git {d['git']}; started {d['started']}, {d['seconds']} s of "
         f"{d['budget_s']:.0f} s budget.", ""]
    skipped = [(k, v) for k, v in P.items() if v["status"] != "ok"]
    if skipped:
        L += ["## Not measured", ""]
        L += [f"- **{k}**: {v['status']}: {v.get('reason', '')}" for k, v in skipped] + [""]
    lg = P.get("logits", {})
    if lg.get("status") == "ok":
        sh = lg["shape"]
        L += ["## bf16 logits vs transformers", "",
              f"Llama-3.2-1B shape (hidden {sh['hidden_size']}, {sh['num_hidden_layers']} "
              f"layers, vocab {sh['vocab_size']}, llama3 rope, tied head), random weights, "
              f"batch {lg['batch'][0]} x {lg['batch'][1]} ({lg['rows']}); real tokens only. "
              f"Peak GPU memory {_gib(lg['peak_gpu_gib'])}.", "",
              "| padding | comparison | max abs | mean abs | top-1 agree |",
              "|---|---|---|---|---|"]
        for side, r in lg["results"].items():
            for k, v in r.items():
                if isinstance(v, dict):
                    L.append(f"| {side} | {k.replace('_', ' ')} | {v['max_abs']} | "
                             f"{v['mean_abs']} | {v['top1_agree']} |")
            L.append(f"| {side} | mean abs logit (fp32) | {r['logit_scale_mean_abs']} | | |")
        L.append("")
    dp = P.get("dpo", {})
    if dp.get("status") == "ok":
        L += ["## DPO step", "", f"`{dp['command']}`; MFU against {dp['peak']}.", "",
              "| head | tokens/s | s/step | MFU | peak GPU GiB | step memory GiB | last loss |",
              "|---|---|---|---|---|---|---|"]
        for head, r in dp["runs"].items():
            L.append(f"| {head} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']} | "
                     f"{100 * r['mfu']:.1f}% | {_gib(r.get('peak_memory_gib'))} | "
                     f"{r['step_memory_gib']} | {r['last_loss']} |")
        L += ["", f"Step memory full / fused: **{dp['memory_ratio_full_over_fused']}x**; "
                  f"tokens/s fused / full: **{dp['speed_ratio_fused_over_full']}x**.", ""]
    runs = [(k, v) for k, v in P.items() if k.startswith("sampler/") and v["status"] == "ok"]
    setup = P.get("sampler", {})
    if runs or setup.get("status") == "ok":
        L += ["## Sampler vs generate()", ""]
        if setup.get("status") == "ok":
            s = setup["shape"]
            L += [f"Random {s['params_M']}M-parameter Llama (hidden {s['hidden']}, {s['layers']} "
                  f"layers, vocab {s['vocab']}, {s['dtype']}; weights of both models "
                  f"{_gib(setup['weights_gpu_gib'])}); {setup['prompts']} prompts x "
                  f"{setup['responses_per_prompt']}, {setup['stop_ids']} stop ids (mean length "
                  f"~{setup['mean_len']:g}), at most {setup['max_new_tokens']} new tokens, "
                  f"{setup['sampling']}. Peak memory includes both models' weights.", ""]
        L += ["| batch | decode | generate() tok/s | ours tok/s | ratio | peak GiB generate() / "
              "ours | our lengths |", "|---|---|---|---|---|---|---|"]
        for _, r in runs:
            kv = r.get("kv", {})
            how = (f"{r['decode']}, {kv.get('kv_cache', r.get('kv_cache'))} KV "
                   f"({kv.get('peak_held_bytes', 0) / 2**30:.1f} GiB held at the peak), caps "
                   f"{'+'.join(map(str, r.get('caps', [])))}")
            L.append(f"| {r['batch']} | {how} | {r.get('generate_tokens_per_s', '-')} | "
                     f"{r['ours_tokens_per_s']} | {r.get('ratio', '-')} | "
                     f"{_gib(r.get('generate_peak_gpu_gib'))} / {_gib(r['ours_peak_gpu_gib'])} | "
                     f"{r['lengths']} |")
        L.append("")
    sb = P.get("sandbox", {})
    if sb.get("status") == "ok":
        L += ["## Sandbox run on CUDA", "", f"`{sb['command']}`: exit {sb['rc']} in "
              f"{sb['wall_s']} s.", "", "```", *sb["tail"], "```", ""]
    return "\n".join(L)


# ---- main


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, GpuCheckArgs(), "python eval/gpu_check.py", __doc__)
    parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    d = dist.init_distributed(None if a.device == "auto" else a.device)
    device = d.device
    cuda = device.type == "cuda"
    size = a.size if a.size != "auto" else ("full" if cuda else "small")
    small = size == "small"
    batches = [int(x) for x in a.batches.split(",")] if a.batches else (
        [4, 8] if small else [64, 256])
    rec = Record(a, argv, device, size)
    deadline = rec.t0 + a.budget_s
    caps = CAPS if cuda else {k: a.budget_s for k in CAPS}
    print(f"gpu check on {rec.data['device']}, sizes {size}, budget {a.budget_s:.0f} s; "
          f"writing {rec.path.with_suffix('.json')} and .md", flush=True)
    if "logits" in parts:
        run_part(rec, "logits", lambda: logits_part(device, small), caps["logits"], deadline)
    if "dpo" in parts:
        run_part(rec, "dpo", lambda: dpo_part(device, small), caps["dpo"], deadline,
                 need=60 if cuda else 0)
    smp = {}
    if "sampler" in parts:
        def setup():
            smp["s"] = Sampler(device, small, batches)
            return smp["s"].describe()
        run_part(rec, "sampler", setup, caps["sampler"], deadline, need=60 if cuda else 0)
        for b in batches:
            if "s" in smp:
                run_part(rec, f"sampler/eager/{b}", lambda: smp["s"].run(b, False),
                         caps["sampler"], deadline, need=30 if cuda else 0)
        for b in batches:  # the dense cache beside the default (paged on CUDA; dense on CPU)
            if "s" in smp:
                run_part(rec, f"sampler/dense/{b}", lambda: smp["s"].run(b, False, "dense"),
                         caps["sampler"], deadline, need=30 if cuda else 0)
        rows = 4 if small else 128
        if "s" in smp:
            run_part(rec, f"sampler/paper_caps/{rows}", lambda: smp["s"].run(rows, False, paper_caps=True),
                     caps["sampler"], deadline, need=30 if cuda else 0)
    if "sandbox" in parts:
        if not cuda:
            rec.skip("sandbox", "needs CUDA (it is `python run_em.py --device cuda`); the CPU "
                                "default run is `python run_em.py`")
        else:
            out_dir = rec.path.parent / (rec.path.name + "_sandbox")
            run_part(rec, "sandbox",
                     lambda: sandbox_part(out_dir, min(caps["sandbox"],
                                                       deadline - time.time() - 5)),
                     caps["sandbox"] + 10, deadline, need=90)
    if "sampler" in parts:
        want = a.compile == "on" or (a.compile == "auto" and cuda)
        for b in batches:
            name = f"sampler/compiled/{b}"
            if not want:
                rec.skip(name, "compiled decode runs on CUDA only by default (a CPU compile "
                               "takes minutes); --compile on forces them")
            elif "s" in smp:
                run_part(rec, name, lambda: smp["s"].run(b, True), caps["sampler_compiled"],
                         deadline, need=60 if cuda else 0)
    smp.clear()
    rec.data["finished"] = True
    rec.data["seconds"] = round(time.time() - rec.t0, 1)
    rec.write()
    print(f"wrote {rec.path.with_suffix('.json')} and {rec.path.with_suffix('.md')} "
          f"({rec.data['seconds']} s)", flush=True)
    return rec.data


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
