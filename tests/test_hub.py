"""Hub ids (org/name) for the model flags: resolved through a Hugging Face cache built here, in the
layout huggingface_hub reads (models--org--name/{refs/main, snapshots/<commit>/, blobs/}); the
network is never touched (HF_HUB_OFFLINE=1, and the download path is checked with a stand-in)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import run_em
from eval import rewardbench, winrate
from mt import chat, hub
from mt import config as C
from mt.checkpoint import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, src: Path) -> Path:
    """`src`'s files as `hf download repo_id` leaves them: blobs named by hash, the snapshot's files
    symlinks to them, refs/main holding the commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    snap.mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_llama_dir, tiny_rm_dir):
    """HF_HUB_CACHE -> tmp_path/hub with tiny-org/llama and tiny-org/rm in it; downloads off.

    huggingface_hub reads both settings into `constants` when it is imported, so the test sets the
    constants (mt/hub.py reads them at call time)."""
    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {"root": root, "llama": cache_model(root, "tiny-org/llama", Path(tiny_llama_dir)),
            "rm": cache_model(root, "tiny-org/rm", Path(tiny_rm_dir))}


def test_cached_id_resolves_to_its_snapshot_and_loads(cache, tiny_llama_dir):
    got = hub.resolve_model("tiny-org/llama", "--policy")
    assert got == cache["llama"] and (got / "config.json").is_symlink()
    # the snapshot (symlinks into blobs/) loads as the directory it came from
    ours, ref = load_model(got), load_model(tiny_llama_dir)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(ours(ids), ref(ids))
    msgs = [{"role": "user", "content": "Hello world"}]
    assert chat.encode_prompt(chat.load_tokenizer(got), msgs) == chat.encode_prompt(
        chat.load_tokenizer(tiny_llama_dir), msgs)


def test_uncached_id_offline_names_hf_download(cache):
    with pytest.raises(hub.HubError) as e:
        hub.resolve_model("tiny-org/missing", "--rm")
    msg = str(e.value)
    assert msg.startswith("--rm tiny-org/missing: not a local directory")
    assert "`hf download tiny-org/missing`" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(cache["root"]) in msg and "Fix: " in msg


def test_download_only_when_allowed(cache, monkeypatch):
    """HF_HUB_OFFLINE unset/0: the library may download (a stand-in records the call here)."""
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(cache["llama"])

    monkeypatch.setattr(hub, "snapshot_download", fake)
    hub.resolve_model("tiny-org/llama", "--policy")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.resolve_model("tiny-org/llama", "--policy")
    assert [kw["local_files_only"] for _, kw in calls] == [True, False]
    # only the files a model directory is read for; no subfolders (Llama-3's original/ copy)
    assert "*.safetensors" in calls[1][1]["allow_patterns"] and "*/*" in calls[1][1]["ignore_patterns"]


def test_directories_and_paths_are_left_alone(cache, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "llama").mkdir(parents=True)  # a local directory shaped like an id wins
    assert hub.resolve_model("tiny-org/llama", "--policy") == Path("tiny-org/llama")
    assert hub.resolve_model(str(tiny_llama_dir), "--policy") == Path(tiny_llama_dir)
    for not_an_id in ("/no/such/dir", "./x/y", "runs/mt/iter1/policy", "a--b/c", "name", ""):
        assert hub.resolve_model(not_an_id, "--policy") == Path(not_an_id)  # loaders report it
    assert hub.is_repo_id("meta-llama/Meta-Llama-3-8B-Instruct") and hub.is_repo_id("a/b.c_d-e")


# the tiny RM's pad == eos warning (tests/test_checkpoint_consumers.py checks it) is not this test's subject
@pytest.mark.filterwarnings("ignore:.*pad_token_id == eos_token_id")
def test_wired_into_the_commands(cache, tmp_path):
    # run_em.py: --policy / --rm
    cfg = run_em.resolve_inputs(C.parse(["--policy", "tiny-org/llama", "--rm", "tiny-org/rm",
                                         "--prompts", "p.jsonl"], C.Config()))
    assert (cfg.policy, cfg.rm) == (str(cache["llama"]), str(cache["rm"]))
    with pytest.raises(hub.HubError, match="hf download tiny-org/nope"):
        run_em.resolve_inputs(C.parse(["--policy", "tiny-org/nope", "--rm", "tiny-org/rm",
                                       "--prompts", "p.jsonl"], C.Config()))
    # eval/rewardbench.py: the id names the official results (results/eval-set/tiny-org/rm.json)
    a = rewardbench.parse_args(["--rm", "tiny-org/rm", "--data", "unused.jsonl"])
    assert a.rm == str(cache["rm"]) and a.name == "tiny-org/rm"
    # eval/winrate.py: an RM's accuracy on pairs, the RM given by its id
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt_id": str(i), "prompt": "Hello world",
                                         "chosen": c, "rejected": r}) + "\n"
                             for i, (c, r) in enumerate([("I am fine.", "No."), ("Blue.", "Red.")])))
    res = winrate.main(["--rm", "tiny-org/rm", "--pairs", str(pairs), "--device", "cpu"])
    assert res["n"] == 2 and res["rm"] == str(cache["rm"])
