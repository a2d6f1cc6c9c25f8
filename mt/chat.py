"""Tokenizers and chat templates: the template applied exactly once, stop ids as a list.

Text crosses stage boundaries; token ids are made here, per model, because the policy and the
reward model may use different tokenizers (the paper pairs a Mistral policy with a Llama-3 RM).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from jinja2.exceptions import SecurityError, TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mt.data import read_json
from mt.errors import UserError

_SENTINEL = "\u2063MT-RESPONSE\u2063"


class ChatTemplateError(UserError):
    """A tokenizer that cannot render chats; the message names the directory and what to change."""


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer, offline; a pad id is guaranteed (eos if the model has none).

    The pad id only fills tensors: every position we read comes from explicit lengths, so pad == eos
    is harmless here (DESIGN.md §4).
    """
    path = Path(path)
    if path.is_file():
        raise ChatTemplateError(f"{path}: is a file, not a model directory. Fix: give the directory "
                                "that holds config.json and the tokenizer files")
    if not path.is_dir():
        raise ChatTemplateError(f"{path}: tokenizer directory does not exist. Fix: check the path")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ChatTemplateError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})."
                                " Fix: copy the tokenizer files of the model it was trained from "
                                "into it")
    try:
        # never run a directory's own Python (transformers may otherwise ask on stdin)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types here; ours names the directory
        raise ChatTemplateError(f"{path}: could not load a tokenizer ({type(e).__name__}: {e})") from None
    if tok.chat_template is None:
        raise ChatTemplateError(
            f"{path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); a chat model needs one. Add the model's template to tokenizer_config.json.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.name_or_path = str(path)
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model",
                   "tokenizer_config.json")


def render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    except SecurityError as e:  # jinja's sandbox stopped the template reaching Python internals
        raise ChatTemplateError(f"{tok.name_or_path}: the chat template tried to leave Jinja's "
                                f"sandbox ({e}); it is not run. Fix: replace 'chat_template' in "
                                "tokenizer_config.json (or chat_template.jinja) with the model's "
                                "published template") from None
    except TemplateError as e:
        raise ChatTemplateError(f"{tok.name_or_path}: the chat template fails ({type(e).__name__}: "
                                f"{e}). Fix: correct 'chat_template' in tokenizer_config.json (or "
                                "chat_template.jinja)") from None


def check_prompt_lengths(tok, prompts: list[dict], limit: int, prompts_path, model_dir=None):
    """Every prompt within --sampling.max_prompt_tokens under the model's chat template, or a
    UserError naming the first that is not (encode_within)."""
    for p in prompts:
        encode_within(tok, p, limit, prompts_path, model_dir)


@lru_cache(maxsize=None)
def _longest_token(tok) -> int:
    return max((len(t) for t in tok.get_vocab()), default=1)


def encode_within(tok, p: dict, limit: int, source, model_dir=None) -> list[int]:
    """The prompt row's ids (encode_prompt), or the UserError naming the row of `source` (its file)
    that is over --sampling.max_prompt_tokens=limit: its id, its length and the flag. A prompt
    longer in characters than `limit` of the vocabulary's longest tokens is over the limit without
    tokenizing it (a 20 MB line)."""
    chars = sum(len(m["content"]) for m in p["prompt"])
    if chars > limit * _longest_token(tok):
        n = f"{chars} characters (more than {limit} tokens can hold)"
    else:
        ids = encode_prompt(tok, p["prompt"])
        if len(ids) <= limit:
            return ids
        n = f"{len(ids)} tokens"
    raise UserError(f"{source}: prompt {p['prompt_id']!r} is {n} under "
                    f"{model_dir or tok.name_or_path}'s chat template, over "
                    f"--sampling.max_prompt_tokens={limit}. Fix: raise "
                    "--sampling.max_prompt_tokens or drop the prompt from the file")


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """Prompt ids ending in the assistant header. The template emits BOS itself: no second BOS."""
    return tok(render(tok, messages, True), add_special_tokens=False)["input_ids"]


@lru_cache(maxsize=None)
def _end_of_turn_text(tok) -> str:
    """What the template writes right after an assistant message (e.g. '<|eot_id|>' or '<|im_end|>\\n')."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = render(tok, msgs, False)
    if _SENTINEL not in text:
        raise ChatTemplateError(f"{tok.name_or_path}: the chat template drops the assistant message")
    return text.split(_SENTINEL, 1)[1]


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn: the first special token the template writes after it."""
    suffix = _end_of_turn_text(tok)
    ids = tok(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    if not ids:
        if tok.eos_token_id is None:
            raise ChatTemplateError(f"{tok.name_or_path}: cannot tell which token ends an assistant turn")
        return tok.eos_token_id
    return ids[0]


def encode_response(tok, response: str) -> list[int]:
    """A finished response's ids, ending in the end-of-turn token (what the policy generated)."""
    return tok(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]


def encode_conversation(tok, messages: list[dict], response: str) -> list[int]:
    """The whole chat with the response as the assistant turn, for a reward model to score."""
    text = render(tok, messages + [{"role": "assistant", "content": response}], False)
    return tok(text, add_special_tokens=False)["input_ids"]


def generation_config(path: Path) -> dict:
    """A model directory's generation_config.json (the stop ids), or the error naming it."""
    cfg = read_json(path, fix="correct it, or delete it (generation then stops at the "
                              "tokenizer's eos and end of turn)")
    if not isinstance(cfg, dict):
        raise ChatTemplateError(f"{path}: not a JSON object. Fix: correct it, or delete it")
    return cfg


def stop_ids(tok, model_dir=None) -> list[int]:
    """Every id that ends generation: generation_config's eos list, the tokenizer's eos, end of turn.

    Llama-3 Instruct stops on both <|eot_id|> and <|end_of_text|>; ChatML models on <|im_end|>.
    """
    ids = []
    gen = Path(model_dir or tok.name_or_path) / "generation_config.json"
    if gen.is_file():
        eos = generation_config(gen).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ChatTemplateError(f"{gen}: eos_token_id {eos!r} is not a token id or a list of "
                                    "them. Fix: correct it, or delete the file")
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    ids.append(end_of_turn_id(tok))
    return sorted(set(int(i) for i in ids))


# ---- the pad token of a reward model we write

# Tokens made to pad, most specific first (Llama-3.1, Pythia/GPT-NeoX, Mistral/Llama-2 fine-tunes, BERT)
PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<PAD>")
# Special tokens a vocabulary reserves for later use: Llama-3, Mistral v0.3, Mistral Tekken, Gemma
RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>|\[control_(\d+)\]|<SPECIAL_(\d+)>|<unused(\d+)>")
NEW_PAD = ("<pad>", "<|mt_pad|>")  # added, the first that is not in the vocabulary yet


@dataclass(frozen=True)
class PadChoice:
    """The pad token a reward model declares: `how` is "kept" (the tokenizer's own, already safe),
    "reserved" (an unused special token of the vocabulary) or "added" (a new token at `id`)."""
    token: str
    id: int
    how: str


def chat_ids(tok) -> set[int]:
    """Every id a rendered chat of this template can contain beyond the message text: a probe with
    each role (without the system turn where the template refuses one), with and without the
    generation prompt, with and without the tokenizer's own special tokens."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]
    ids: set[int] = set()
    for msgs in ([{"role": "system", "content": "be brief"}] + turns, turns):
        try:
            texts = [render(tok, msgs, False), render(tok, msgs[:-1], True)]
        except Exception:  # noqa: BLE001 - a template may raise on a system turn (Mistral)
            continue
        for text in texts:
            for special in (False, True):
                ids.update(tok(text, add_special_tokens=special)["input_ids"])
    return ids


def _special_tokens(tok) -> dict[int, str]:
    return {int(i): str(t.content) for i, t in tok.added_tokens_decoder.items() if t.special}


def rm_pad_token(tok, vocab_size: int, avoid=()) -> PadChoice:
    """A pad id for a reward model that never occurs in text, so `transformers`' sequence classifiers
    (which pool at the last token that is not pad_token_id) score the token we trained on.

    Unsafe: bos, eos, unk, the end-of-turn token, `avoid` (config.json's eos ids) and any id the chat
    template writes. In order: the tokenizer's own pad if it is a special token and safe; else a
    vocabulary pad token (PAD_NAMES order); else the highest-numbered reserved special token; else
    a new token (NEW_PAD) after the last id, for which the caller grows the embedding when needed.
    Every candidate must have a row in the embedding (id < vocab_size).
    """
    unsafe = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, *avoid} | chat_ids(tok)
    try:
        unsafe.add(end_of_turn_id(tok))
    except ChatTemplateError:
        pass
    specials = {i: t for i, t in _special_tokens(tok).items() if i < vocab_size and i not in unsafe}
    if tok.pad_token_id in specials:
        return PadChoice(specials[tok.pad_token_id], tok.pad_token_id, "kept")
    by_name = {t: i for i, t in specials.items()}
    for name in PAD_NAMES:
        if name in by_name:
            return PadChoice(name, by_name[name], "reserved")
    reserved = []
    for i, t in specials.items():
        m = RESERVED.fullmatch(t)
        if m:
            reserved.append((int(next(g for g in m.groups() if g is not None)), i, t))
    if reserved:
        _, i, t = max(reserved)
        return PadChoice(t, i, "reserved")
    vocab = tok.get_vocab()
    name = next(n for n in NEW_PAD if n not in vocab)
    return PadChoice(name, max(vocab.values()) + 1, "added")


# ---- training examples: token ids made once, with the policy's or the RM's own tokenizer


@dataclass(frozen=True)
class Example:
    """One training item. Sequences are prompt + response ids; `*_start` is the first response index.

    Pairs (DPO, RM) fill chosen and rejected; SFT uses `chosen` only. The RM reads its score at the
    last token, so its `*_start` is unused.
    """
    key: str  # pair id: the key of ref_logps.jsonl
    prompt_id: str
    chosen: tuple[int, ...]
    chosen_start: int
    rejected: tuple[int, ...] = ()
    rejected_start: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def pair_id(prompt_id: str, chosen: str, rejected: str) -> str:
    """A stable id for a pair (a prompt may have several pairs; read_pairs forbids exact duplicates)."""
    return hashlib.sha256(json.dumps([prompt_id, chosen, rejected]).encode()).hexdigest()[:16]


def policy_examples(tok, pairs: list[dict], max_length: int) -> tuple[list[Example], int]:
    """DPO examples: prompt (chat template, once) + response + end-of-turn; pairs over max_length dropped.

    Returns (examples, n_dropped). Prompt and response are tokenized apart, as the sampler made them.
    """
    out, dropped = [], 0
    for p in pairs:
        x = encode_prompt(tok, p["prompt"])
        yc, yr = encode_response(tok, p["chosen"]), encode_response(tok, p["rejected"])
        if len(x) + max(len(yc), len(yr)) > max_length:
            dropped += 1  # never truncated: a cut response would teach the wrong ending
            continue
        key = pair_id(p["prompt_id"], p["chosen"], p["rejected"])
        out.append(Example(key, p["prompt_id"], tuple(x + yc), len(x), tuple(x + yr), len(x)))
    return out, dropped


def rm_examples(tok, pairs: list[dict], max_length: int) -> tuple[list[Example], int]:
    """Bradley-Terry examples: each whole chat rendered by the RM's own template; over-long pairs dropped."""
    out, dropped = [], 0
    for p in pairs:
        c = encode_conversation(tok, p["prompt"], p["chosen"])
        r = encode_conversation(tok, p["prompt"], p["rejected"])
        if max(len(c), len(r)) > max_length:
            dropped += 1
            continue
        key = pair_id(p["prompt_id"], p["chosen"], p["rejected"])
        out.append(Example(key, p["prompt_id"], tuple(c), 0, tuple(r), 0))
    return out, dropped


def sft_examples(tok, items, max_length: int) -> tuple[list[Example], int]:
    """SFT examples from (prompt_id, messages, response) triples; the loss covers the response only."""
    out, dropped = [], 0
    for prompt_id, messages, response in items:
        x, y = encode_prompt(tok, messages), encode_response(tok, response)
        if len(x) + len(y) > max_length:
            dropped += 1
            continue
        out.append(Example(pair_id(prompt_id, response, ""), prompt_id, tuple(x + y), len(x)))
    return out, dropped
