"""mt/scoring.py: RM scores equal a transformers forward of the RM's own chat rendering, whatever the batching,
in input order, aligned with samples rows, and the same when 2 gloo processes split the work."""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import hf_model
from mt.chat import encode_conversation, load_tokenizer
from mt.checkpoint import CheckpointError
from mt.data import read_samples, read_scores, write_jsonl
from mt.scoring import load_rm, score_conversations, score_file, score_samples

ROOT = str(Path(__file__).resolve().parents[1])
ANSWERS = ["four", "The sea is blue and wide, and the sky is blue.", "", "Hello world, how are you today? I am fine",
           "two plus two", "The quick brown fox jumps over the lazy dog. " * 3, "fine"]



def _items():
    qs = ["What is two plus two?", "Write a short poem about the sea.", "Explain why the sky is blue"]
    return [([{"role": "user", "content": qs[i % 3]}], a) for i, a in enumerate(ANSWERS)]


@torch.no_grad()
def _hf_scores(rm_dir, items):
    """transformers, one unpadded conversation at a time, the score head read at the last token."""
    hf, tok = hf_model(rm_dir, "score"), load_tokenizer(rm_dir)
    out = []
    for msgs, y in items:
        ids = torch.tensor([encode_conversation(tok, msgs, y)])
        out.append(hf.score(hf.model(input_ids=ids).last_hidden_state)[0, -1, 0].item())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # Llama-3 template with pad == eos; ChatML
def test_scores_equal_transformers_in_input_order(tiny_checkpoint, family):
    rm_dir = tiny_checkpoint(family, "score")
    items = _items()
    want = _hf_scores(rm_dir, items)
    for kw in (dict(batch_size=64), dict(batch_size=2), dict(batch_size=64, max_tokens=60)):
        got = score_conversations(rm_dir, items, progress=False, **kw)
        assert got == pytest.approx(want, abs=1e-5), kw
    rm, tok = load_rm(rm_dir)
    assert score_conversations(rm, items, tok, progress=False) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="own tokenizer"):
        score_conversations(rm, items)


def test_score_file_rows_align_with_samples(tiny_rm_dir, tmp_path):
    items = _items()
    rows = [{"prompt_id": f"q{i}", "prompt": items[i][0], "responses": [a for _, a in items[i::3]],
             "finish_reasons": ["stop"] * len(items[i::3]), "num_tokens": [3] * len(items[i::3])} for i in range(3)]
    write_jsonl(tmp_path / "samples.jsonl", rows)
    out = score_file(tiny_rm_dir, tmp_path / "samples.jsonl", tmp_path / "scores.jsonl", progress=False)
    scores = read_scores(tmp_path / "scores.jsonl")
    assert scores == out  # a scores row is its dict
    by_id = {s["prompt_id"]: s["scores"] for s in scores}
    assert [s["prompt_id"] for s in read_samples(tmp_path / "samples.jsonl")] == list(by_id)
    for row in rows:
        assert by_id[row["prompt_id"]] == pytest.approx(_hf_scores(tiny_rm_dir, [(row["prompt"], y) for y in row["responses"]]), abs=1e-5)
    rm, tok = load_rm(tiny_rm_dir)
    again = score_samples(rm, read_samples(tmp_path / "samples.jsonl"), tok, progress=False)
    # pytest.approx takes no nested rows: compare ids exactly and each row's scores with approx's default tolerance
    assert [r["prompt_id"] for r in again] == [r["prompt_id"] for r in out]
    for got, want in zip(again, out):
        assert got["scores"] == pytest.approx(want["scores"])


def test_a_causal_lm_is_not_a_reward_model(tiny_llama_dir):
    with pytest.raises(CheckpointError, match="not a reward model"):
        score_conversations(tiny_llama_dir, _items(), progress=False)


# ---- data-parallel: 2 gloo processes, each a strided share, gathered back in order


def _worker(rank, rm_dir, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from mt import dist
    dist.init_distributed("cpu")

    def job():
        got = score_conversations(rm_dir, _items(), batch_size=2, progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    dist.run(job)  # the commands' own exit path


def test_two_processes_score_like_one(tiny_rm_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(str(tiny_rm_dir), str(tmp_path), port), nprocs=2, join=True)
    want = score_conversations(tiny_rm_dir, _items(), progress=False)
    for r in range(2):  # every rank returns the whole list, in input order
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == pytest.approx(want, abs=1e-6)
