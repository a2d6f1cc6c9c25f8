"""The gold-reward sandbox: a small world with a known judge,
where the paper's problem can happen and its claim can be checked.

    world = build_world(seed=0)  # π0, r0, prompts; built once (~2 min on 2 CPU cores), then cached
    python run_em.py             # Mutual-Taught on this world (mt/config.py PRESETS["sandbox"])

Task: sort a short list of numbers ("sort: 7 3 9 1" -> "1 3 7 9", or "1 , 3 7 , 9": a comma
between two numbers is style, not content, so good answers are many strings, as in chat). The
gold reward grades a response (order, missing and extra items). π0 is a tiny Llama SFT'd on
imperfect demonstrations (swaps, drops). Two worlds (WORLDS):

- "general" (the default): r0 is trained with Bradley-Terry on noisy gold-labelled pairs from a
  mixture of generators (GENERATORS: near-perfect, swapping, dropping, padding with repeats,
  truncating, junk-inserting, unsorted, and π0 itself), as the paper's r0 (FsfairX-LLaMA3-RM) was
  trained on many models' responses.
- "exploit": r0 is trained only on π0's own samples (which never pad), so it is right on π0's
  distribution and blind beyond it: DPO against it finds the blind spot (padding with repeats).

The gold metrics (mt/gold.py) measure what the paper can only estimate: policy quality and the
RMs' agreement with the truth on each policy's samples.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedTokenizerFast

from mt import chat
from mt import config as C
from mt.checkpoint import load_model, weight_files
from mt.data import read_json, write_json, write_jsonl
from mt.errors import UserError
from mt.losses import BRADLEY_TERRY, SFT
from mt.model import ModelConfig, Transformer
from mt.sampler import sample
from mt.scoring import score_conversations
from mt.train import train

# ---- the task: prompts and the gold reward

NUM_MAX = 30  # numbers are 0..NUM_MAX-1, one token each
LIST_LEN = (4, 8)  # the general world's prompts list this many distinct numbers (inclusive)
PREFIX = "sort:"
SEP = ","  # an optional separator between two numbers: gold ignores it there


def make_numbers(rng: random.Random, list_len: tuple[int, int] = LIST_LEN) -> list[int]:
    """One prompt's numbers: distinct, in random order."""
    return rng.sample(range(NUM_MAX), rng.randint(*list_len))


def prompt_text(nums: list[int]) -> str:
    return f"{PREFIX} " + " ".join(map(str, nums))


def parse_numbers(text: str) -> list[int]:
    """The numbers of a prompt ("sort: 7 3 9 1" or a chat whose last user message is that)."""
    if isinstance(text, list):  # a chat: the task is in the last user message
        text = [m["content"] for m in text if m["role"] == "user"][-1]
    body = text.strip()
    if not body.startswith(PREFIX):
        raise ValueError(f"not a sandbox prompt (expected {PREFIX!r} then numbers): {text!r}")
    return [int(t) for t in body[len(PREFIX):].split()]


_NUMBER = re.compile(r"0|[1-9][0-9]*")


def content_tokens(response: str) -> list[str]:
    """The response's tokens without the separators that stand between two numbers (style); a
    separator anywhere else (leading, trailing, doubled, next to a word) stays, as junk."""
    toks = response.split()
    num = [bool(_NUMBER.fullmatch(t)) for t in toks]
    return [t for i, t in enumerate(toks)
            if not (t == SEP and 0 < i < len(toks) - 1 and num[i - 1] and num[i + 1])]


def gold_parts(prompt, response: str) -> dict[str, float]:
    """The three factors of the gold reward, each in [0, 1].

    recall: share of the prompt's numbers present (multiset); precision: share of the response's
    content tokens that are wanted numbers (repeats, foreign numbers, junk words and stray
    separators all count against it); order: 1 - 0.5 * inversions / pairs, so a fully reversed
    list keeps half the credit and one swap costs little.
    """
    want = Counter(parse_numbers(prompt))
    toks = content_tokens(response)
    nums = [int(t) for t in toks if _NUMBER.fullmatch(t)]
    hit = sum((Counter(nums) & want).values())
    recall = hit / max(1, sum(want.values()))
    precision = hit / len(toks) if toks else 0.0
    pairs = len(nums) * (len(nums) - 1) // 2
    inversions = sum(a > b for i, a in enumerate(nums) for b in nums[i + 1:])
    order = 1.0 - 0.5 * inversions / pairs if pairs else 1.0
    return {"recall": recall, "precision": precision, "order": order}


def gold_reward(prompt, response: str) -> float:
    """Gold reward in [0, 1]: recall * precision * order; 1 exactly for the sorted permutation
    (with or without separators between numbers).

    A missing item (recall (n-1)/n) costs more than one adjacent swap (order 1 - 0.5/C(n,2)) for
    every n >= 3; empty or junk-only responses score 0.
    """
    p = gold_parts(prompt, response)
    return p["recall"] * p["precision"] * p["order"]


def corrupt(target: list[int], rng: random.Random, p_clean: float = 0.3,
            ops: tuple[str, ...] = ("swap", "drop", "repeat")) -> list[int]:
    """An imperfect demonstration: the sorted list hit by 1-3 swaps, drops
    and repeats (or left clean).

    The SFT policy imitates these mistakes, so π0 starts clearly below the best (Sec. 5: the base
    policy is an SFT model, not an optimal one).
    """
    out = list(target)
    if rng.random() < p_clean:
        return out
    for _ in range(rng.choice((1, 1, 2, 3))):
        op, i = rng.choice(ops), rng.randrange(len(out))
        if op == "swap" and len(out) > 1:
            j = i + 1 if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif op == "drop" and len(out) > 2:
            del out[i]
        elif op == "repeat":
            out.insert(i, out[i])
    return out


def render(tokens: list, rng: random.Random, sep_rate: float) -> str:
    """A response's text: the tokens, with a separator between two numbers at rate sep_rate."""
    out = []
    for t in map(str, tokens):
        if out and sep_rate and _NUMBER.fullmatch(out[-1]) and _NUMBER.fullmatch(t) \
                and rng.random() < sep_rate:
            out.append(SEP)
        out.append(t)
    return " ".join(out)


# ---- the generators of the general r0's training data: policies of different skill and error
# profile (as the paper's r0 saw many models' responses); π0's own samples are one more source


def _junk(s, nums, rng):
    out = [str(x) for x in corrupt(s, rng, 0.3, ("swap", "drop"))]
    foreign = [str(x) for x in range(NUM_MAX) if x not in nums]
    for _ in range(rng.randint(1, 3)):
        out.insert(rng.randrange(len(out) + 1), rng.choice(foreign + list(WORDS)))
    return out


GENERATORS: dict[str, Callable] = {  # (sorted target, prompt numbers, rng) -> response tokens
    "near_perfect": lambda s, nums, rng: corrupt(s, rng, 0.8, ("swap",)),
    "swaps": lambda s, nums, rng: corrupt(s, rng, 0.0, ("swap",)),
    "drops": lambda s, nums, rng: corrupt(s, rng, 0.0, ("drop",)),
    "repeats": lambda s, nums, rng: (corrupt(s, rng, 0.0, ("repeat",))
                                     + [s[-1]] * rng.randint(0, 2)),
    "truncated": lambda s, nums, rng: s[:rng.randint(1, len(s) - 1)],
    "junk": _junk,
    "unsorted": lambda s, nums, rng: list(nums) if rng.random() < 0.5 else s[::-1],
}


def generate(name: str, nums: list[int], rng: random.Random, sep_rate: float) -> str:
    return render(GENERATORS[name](sorted(nums), nums, rng), rng, sep_rate)


def make_prompts(n: int, seed: int, list_len: tuple[int, int] = LIST_LEN) -> list[dict]:
    """`n` prompt rows in the project's prompt-file format, {"id", "prompt"},
    deterministic from the seed."""
    rng = random.Random(f"sandbox-prompts:{seed}")
    return [{"id": f"sort-{seed}-{i:05d}", "prompt": prompt_text(make_numbers(rng, list_len))}
            for i in range(n)]


def write_prompts(path, n: int, seed: int, list_len: tuple[int, int] = LIST_LEN):
    write_jsonl(path, make_prompts(n, seed, list_len))
    return path


# ---- the tokenizer: one token per number, word or special token

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>")
WORDS = ("sort", ":", SEP)
# The template writes BOS itself (DESIGN.md §4: tokenize its output without adding specials again)
# and ends every turn with <|end|>, which is what the policy emits to stop
# (mt/chat.end_of_turn_id).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(out_dir):
    """A word-level PreTrainedTokenizerFast with the chat template,
    saved as a Hugging Face directory."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + tuple(map(str, range(NUM_MAX))))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "sort: 7 3" -> sort, :, 7, 3
    core.add_special_tokens(list(SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(out_dir))
    return tok


# ---- the world: tokenizer, base policy π0 (SFT), base RM r0 (Bradley-Terry),
# prompt set, all from a seed


@dataclass(frozen=True)
class WorldConfig:
    """Everything the built artifacts depend on (with the source code): the cache key."""
    seed: int = 0
    # the run's prompt set D: run_em splits it into D_MS (400) and D_R, D_1, D_2 (1,300 each)
    n_prompts: int = 4300
    list_len: tuple[int, int] = LIST_LEN  # numbers per prompt (inclusive range)
    # share of the gaps between two numbers that get a separator, in demonstrations and
    # generators: an equally good answer has many surface forms (few identical responses)
    separators: float = 0.5
    # the tiny Llama-shaped models
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # π0: SFT on imperfect demonstrations
    # share of demonstrations left uncorrupted: none, so π0 has headroom (≈ 23% perfect answers):
    # a policy far better than π0 can then win Eq. 6 against it by more than τ
    demo_clean: float = 0.0
    # The corruptions of the others. No repeats on purpose: π0 then never pads, so on π0's samples
    # a longer response is a more complete one -- the blind spot an r0 trained only on π0's
    # samples ("exploit" world) has.
    demo_ops: str = "swap,drop"
    sft_examples: int = 12800
    sft_epochs: int = 4
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    # r0: Bradley-Terry on gold-labelled pairs of responses from the mixture of GENERATORS and π0
    # ("mixture"), or of π0's own samples only ("pi0")
    r0_data: str = "mixture"
    rm_prompts: int = 1500
    rm_samples: int = 4  # per prompt; every pair of them with different gold gives a pair
    label_noise: float = 0.1  # share of pairs whose gold label is flipped (annotators disagree)
    rm_epochs: int = 4
    rm_lr: float = 1e-3
    rm_batch_size: int = 32
    eval_prompts: int = 200  # held-out prompts for the build report (world.json)


# the two regimes (--sandbox.world): fixed before any method was compared (README)
WORLDS: dict[str, WorldConfig] = {
    "general": WorldConfig(),
    # the first world: lists of 3-8, no separators (every perfect answer is one string), 30%
    # clean demonstrations (π0 ≈ 53% perfect), r0 trained on 1,000 prompts x 4 of π0's own
    # samples for 4 epochs
    "exploit": WorldConfig(list_len=(3, 8), separators=0.0, demo_clean=0.3, r0_data="pi0",
                           rm_prompts=1000),
}


@dataclass(frozen=True)
class World:
    root: Path
    policy_dir: Path  # π0, a LlamaForCausalLM directory with the tokenizer
    rm_dir: Path  # r0, a LlamaForSequenceClassification directory (num_labels=1)
    prompts_path: Path  # {"id", "prompt"} JSONL
    rm_pairs_path: Path  # the gold-labelled (noisy) pairs r0 was trained on
    config: WorldConfig
    info: dict  # build report: base gold, r0 agreement with gold, times (world.json)
    gold: Callable = gold_reward  # gold(prompt, response) -> float


def _policy_hf_config(c: WorldConfig, tok) -> dict:
    """config.json of π0: a Llama with vocabulary = the sandbox tokenizer,
    positions for the longest chat."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok),
            "hidden_size": c.hidden_size, "intermediate_size": 3 * c.hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_heads, "head_dim": c.hidden_size // c.num_heads,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def _sampling() -> C.SamplingConfig:
    """run_em's sandbox sampling (PRESETS["sandbox"]),
    so r0 is trained on π0's run-time distribution."""
    return C.parse(["--preset", "sandbox"], C.Config()).sampling


def _prompts(n: int, seed: int, stream: str, list_len: tuple[int, int] = LIST_LEN):
    """Prompt rows (for the sampler) of a named stream,
    disjoint in id from the run's prompt file."""
    rng = random.Random(f"sandbox-{stream}:{seed}")
    return [{"prompt_id": f"{stream}-{i:05d}",
             "prompt": [{"role": "user", "content": prompt_text(make_numbers(rng, list_len))}]}
            for i in range(n)]


def mixture_samples(pi0_samples: list[dict], sep_rate: float, seed: int,
                    sources: tuple[str, ...] = ("pi0", *GENERATORS)) -> list[dict]:
    """The general r0's responses: each of a prompt's responses from a source drawn uniformly
    from `sources` (π0's own sample in that slot, or a GENERATORS policy); rows gain "sources"."""
    rng = random.Random(f"sandbox-mixture:{seed}")
    out = []
    for row in pi0_samples:
        nums = parse_numbers(row["prompt"])
        src = [rng.choice(sources) for _ in row["responses"]]
        ys = [y if g == "pi0" else generate(g, nums, rng, sep_rate)
              for g, y in zip(src, row["responses"])]
        out.append({**row, "responses": ys, "sources": src})
    return out


def generator_samples(prompts: list[dict], name: str, n: int, sep_rate: float,
                      seed: int) -> list[dict]:
    """n responses per prompt from one GENERATORS policy (samples rows)."""
    rng = random.Random(f"sandbox-generator:{name}:{seed}")
    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"],
             "responses": [generate(name, parse_numbers(p["prompt"]), rng, sep_rate)
                           for _ in range(n)]} for p in prompts]


def identical_rate(samples: list[dict]) -> float:
    """Share of prompts whose first two responses are the same string: how often Eq. 6 would
    see a tie between two independent draws of this policy."""
    rows = [r for r in samples if len(r["responses"]) >= 2]
    return sum(r["responses"][0] == r["responses"][1] for r in rows) / max(1, len(rows))


def gold_pairs(samples: list[dict], label_noise: float = 0.0, seed: int = 0) -> list[dict]:
    """Every within-prompt pair of responses with different gold, chosen = higher gold (flipped
    with probability label_noise): the annotated preference data a base RM is trained on. Each
    pair names the source of its two responses (a generator, or "pi0")."""
    rng = random.Random(f"sandbox-label-noise:{seed}")
    out = []
    for row in samples:
        ys = row["responses"]
        src = row.get("sources") or ["pi0"] * len(ys)
        g = [gold_reward(row["prompt"], y) for y in ys]
        for i in range(len(ys)):
            for j in range(i + 1, len(ys)):
                if g[i] == g[j] or ys[i] == ys[j]:
                    continue
                c, r = (i, j) if g[i] > g[j] else (j, i)
                flipped = rng.random() < label_noise
                if flipped:
                    c, r = r, c
                out.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"],
                            "chosen": ys[c], "rejected": ys[r], "chosen_gold": g[c],
                            "rejected_gold": g[r], "flipped": flipped,
                            "sources": [src[c], src[r]]})
    return out


def _build(c: WorldConfig, root: Path) -> dict:
    """Write tokenizer/, policy/ (π0), rm/ (r0), prompts.jsonl, rm_pairs.jsonl
    and world.json under root."""
    t0 = time.perf_counter()
    times = {}
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    tok = chat.load_tokenizer(tok_dir)
    sampling = _sampling()
    gen_cfg = {"bos_token_id": tok.bos_token_id, "eos_token_id": chat.stop_ids(tok),
               "pad_token_id": tok.pad_token_id, "do_sample": True,
               "temperature": sampling.temperature, "top_p": sampling.top_p}
    (tok_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    write_prompts(root / "prompts.jsonl", c.n_prompts, c.seed, c.list_len)

    # ---- π0: SFT on imperfect demonstrations (c.demo_ops: swaps and drops by default)
    rng = random.Random(f"sandbox-demos:{c.seed}")
    demos = []
    for i in range(c.sft_examples):
        nums = make_numbers(rng, c.list_len)
        demo = corrupt(sorted(nums), rng, c.demo_clean, tuple(c.demo_ops.split(",")))
        demos.append((f"demo-{i}", [{"role": "user", "content": prompt_text(nums)}],
                      render(demo, rng, c.separators)))
    examples, _ = chat.sft_examples(tok, demos, max_length=64)
    torch.manual_seed(c.seed)
    policy = Transformer(ModelConfig.from_hf(_policy_hf_config(c, tok)))
    policy.init_weights()
    sft = C.TrainConfig(lr=c.sft_lr, batch_size=c.sft_batch_size,
                        micro_batch_size=c.sft_batch_size, epochs=c.sft_epochs, warmup_ratio=0.05,
                        max_length=64, save_every=0, seed=c.seed)
    train(policy, examples, SFT, sft, root / "sft", pad_id=tok.pad_token_id, tokenizer_dir=tok_dir,
          generation_config=gen_cfg, progress=False, desc="sandbox π0 (SFT)")
    os.replace(root / "sft" / "final", root / "policy")
    times["sft_s"] = time.perf_counter() - t0

    # ---- r0: Bradley-Terry on noisy gold-labelled pairs: of the mixture's responses (general)
    # or of π0's own samples (exploit)
    policy = load_model(root / "policy").eval()
    rm_samples = sample(policy, tok, _prompts(c.rm_prompts, c.seed, "rm", c.list_len), sampling,
                        seed=c.seed, stream="sandbox/rm", n=c.rm_samples)
    if c.r0_data == "mixture":
        rm_samples = mixture_samples(rm_samples, c.separators, c.seed)
    elif c.r0_data != "pi0":
        raise ValueError(f"WorldConfig.r0_data={c.r0_data!r}: expected 'mixture' or 'pi0'")
    pairs = gold_pairs(rm_samples, c.label_noise, c.seed)
    write_jsonl(root / "rm_pairs.jsonl", pairs)
    examples, _ = chat.rm_examples(tok, pairs, max_length=64)
    torch.manual_seed(c.seed)  # the fresh score head
    rm = load_model(root / "policy", head="score")
    rm.cfg.hf["pad_token_id"] = tok.pad_token_id
    rmc = C.RMConfig(lr=c.rm_lr, batch_size=c.rm_batch_size, micro_batch_size=c.rm_batch_size,
                     epochs=c.rm_epochs, warmup_ratio=0.05, max_length=64, save_every=0,
                     seed=c.seed)
    train(rm, examples, BRADLEY_TERRY, rmc, root / "rm_train", pad_id=tok.pad_token_id,
          tokenizer_dir=tok_dir, generation_config=gen_cfg, progress=False,
          desc="sandbox r0 (Bradley-Terry)")
    os.replace(root / "rm_train" / "final", root / "rm")
    times["rm_s"] = time.perf_counter() - t0 - times["sft_s"]

    # ---- the build report, on held-out prompts: how good π0 is, how often two of its answers
    # are identical, and r0's gold agreement on each generator's pairs and on π0's
    eval_prompts = _prompts(c.eval_prompts, c.seed, "eval", c.list_len)
    held = sample(policy, tok, eval_prompts, sampling, seed=c.seed, stream="sandbox/eval",
                  n=c.rm_samples)
    agreement = {"pi0": rm_gold_agreement(root / "rm", sample_pairs(held))}
    for name in GENERATORS:
        rows = generator_samples(eval_prompts, name, c.rm_samples, c.separators, c.seed)
        agreement[name] = rm_gold_agreement(root / "rm", sample_pairs(rows))
    agreement["mixture"] = rm_gold_agreement(
        root / "rm", sample_pairs(mixture_samples(held, c.separators, c.seed + 1)))
    info = {"base_gold": policy_gold(held), "base_perfect": policy_gold(held, perfect=True),
            "base_identical": identical_rate(held), "rm_pairs": len(pairs),
            "rm_pairs_by_source": dict(sorted(Counter(s for p in pairs
                                                      for s in p["sources"]).items())),
            "rm_agreement_base": agreement["pi0"], "rm_agreement": agreement,
            **{k: round(v, 1) for k, v in times.items()},
            "build_s": round(time.perf_counter() - t0, 1)}
    return info


# ---- the cached build


def _code_hash() -> str:
    """The source of every module the build may run: a code change never serves a stale world.
    (mt/gold.py only measures runs; the build never imports it.)"""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(__file__).parent.glob("*.py") if p.name != "gold.py"):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def world_key(c: WorldConfig) -> str:
    payload = json.dumps([dataclasses.asdict(c), _code_hash()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MT_SANDBOX_CACHE") or Path.home() / ".cache" / "mutual_taught")


def is_world_prompts(path) -> bool:
    """Is this prompt file a sandbox world's (so the gold reward applies)?"""
    path = Path(path)
    return path.name == "prompts.jsonl" and (path.parent / "world.json").is_file()


def _world(c: WorldConfig, root: Path, info: dict) -> World:
    return World(root, root / "policy", root / "rm", root / "prompts.jsonl",
                 root / "rm_pairs.jsonl", c, info)


def build_world(seed: int = 0, cache_dir=None, world: str = "general", **overrides) -> World:
    """The sandbox world `world` (WORLDS) for `seed`, built once (≈2 min on 2 CPU cores)
    and then read from the cache.

    `overrides` change WorldConfig fields (tests build smaller worlds). The cache directory is
    `cache_dir` or $MT_SANDBOX_CACHE or ~/.cache/mutual_taught; a lock file serialises concurrent
    builds.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown sandbox world {world!r}; known: {', '.join(WORLDS)}")
    c = dataclasses.replace(WORLDS[world], seed=seed, **overrides)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"sandbox-{world_key(c)}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the world built
        for stale in cache.glob(f".{root.name}.tmp-*"):  # a killed build's (builds hold this lock)
            shutil.rmtree(stale, ignore_errors=True)
        if not (root / "world.json").is_file():
            tmp = cache / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
            threads = torch.get_num_threads()
            # one thread: as fast for models this small,
            # and no spinning OpenMP workers on a shared machine
            torch.set_num_threads(1)
            try:
                print(f"building the sandbox world {world!r} (seed {seed}) in {root} ...",
                      flush=True)
                info = _build(c, tmp)
                info["config"] = dataclasses.asdict(c)
                write_json(tmp / "world.json", info)
                if root.exists():
                    shutil.rmtree(root)
                os.replace(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                torch.set_num_threads(threads)
            print(f"sandbox world built in {info['build_s']}s: π0 gold {info['base_gold']:.3f}, "
                  f"r0 agrees with gold on {100 * info['rm_agreement_base']['agreement']:.1f}% of "
                  "π0's pairs", flush=True)
    try:  # a damaged cache entry: say that deleting it rebuilds the world
        info = read_json(root / "world.json")
        for model in (root / "policy", root / "rm"):
            for f in weight_files(model):
                safe_open(str(f), "pt").keys()  # the header and the file's length, not the data
        if not (root / "prompts.jsonl").is_file():
            raise UserError(f"{root / 'prompts.jsonl'}: missing")
    except (UserError, OSError, SafetensorError) as e:
        raise UserError(f"the sandbox world cache entry {root} is damaged ({e}). Fix: delete "
                        f"{root} (rm -r it); the next run rebuilds it") from None
    return _world(c, root, info)


# ---- gold metrics (what run_em prints per iteration)


def gold_scores(samples) -> list[dict]:
    """scores.jsonl rows with the GOLD reward: the oracle judge,
    aligned with each row's responses."""
    return [{"prompt_id": r["prompt_id"],
             "scores": [gold_reward(r["prompt"], y) for y in r["responses"]]}
            for r in samples]


def policy_gold(samples, perfect: bool = False) -> float:
    """Mean gold reward over every response of samples rows (or, with perfect,
    the share scoring 1)."""
    g = [s == 1.0 if perfect else s for row in gold_scores(samples) for s in row["scores"]]
    return sum(g) / max(1, len(g))


def gold_win_rate(new_samples, old_samples) -> dict:
    """Gold win rate of a policy against another (e.g. π0) on the same prompts,
    response j against j.

    win_rate = (wins + ties / 2) / n; ties are frequent here (both responses perfect),
    so they are reported.
    """
    old = {r["prompt_id"]: r for r in old_samples}
    w = t = n = 0
    for r in new_samples:
        o = old.get(r["prompt_id"])
        if o is None:
            continue
        for a, b in zip(r["responses"], o["responses"]):
            ga, gb = gold_reward(r["prompt"], a), gold_reward(r["prompt"], b)
            w, t, n = w + (ga > gb), t + (ga == gb), n + 1
    if n == 0:
        raise ValueError("gold_win_rate: the two sample sets share no prompt id")
    return {"win_rate": (w + t / 2) / n, "win": w / n, "tie": t / n, "loss": (n - w - t) / n,
            "n": n}


def sample_pairs(samples) -> list[dict]:
    """Every within-prompt pair of a policy's responses with different gold
    (chosen = higher gold)."""
    return gold_pairs(samples, label_noise=0.0)


def pair_gold_accuracy(pairs) -> dict:
    """Share of pairs whose chosen response has strictly higher gold than the rejected one (gold
    ties are counted apart: `accuracy` is over the pairs gold decides; `ties` over all pairs)."""
    right = ties = n = 0
    for p in pairs:
        gc, gr = gold_reward(p["prompt"], p["chosen"]), gold_reward(p["prompt"], p["rejected"])
        right, ties, n = right + (gc > gr), ties + (gc == gr), n + 1
    return {"accuracy": right / (n - ties) if n > ties else float("nan"), "ties": ties / max(1, n),
            "n": n}


def rm_gold_agreement(rm, pairs, tok=None) -> dict:
    """Share of pairs the RM orders as gold does (RM ties count as disagreement); pairs gold ties
    are skipped. `rm` is a directory or a loaded model with its tokenizer."""
    rows = [p for p in pairs
            if gold_reward(p["prompt"], p["chosen"]) != gold_reward(p["prompt"], p["rejected"])]
    if not rows:
        return {"agreement": float("nan"), "n": 0}
    items = ([(p["prompt"], p["chosen"]) for p in rows]
             + [(p["prompt"], p["rejected"]) for p in rows])
    s = score_conversations(rm, items, tok, progress=False)
    n = len(rows)
    agree = 0
    for p, sc, sr in zip(rows, s[:n], s[n:]):
        gold_c_better = (gold_reward(p["prompt"], p["chosen"])
                         > gold_reward(p["prompt"], p["rejected"]))
        agree += (sc > sr) if gold_c_better else (sr > sc)
    return {"agreement": agree / n, "n": n}
