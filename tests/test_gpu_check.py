"""eval/gpu_check.py on the CPU: shrunk sizes, every part run or skipped with its reason, both
files written, so the check is known to work before a GPU is lent."""
import json

import pytest
import torch

from eval import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; a GPU runs the full check")
def test_gpu_check_on_cpu_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "gc"
    data = gpu_check.main(["--out", str(out), "--device", "cpu", "--threads", "1"])
    saved = json.loads((out.with_suffix(".json")).read_text())
    assert saved == json.loads(json.dumps(data, default=str)) and saved["finished"]
    assert saved["size"] == "small" and saved["device"].startswith("cpu")
    P = saved["parts"]
    ok = [k for k, v in P.items() if v["status"] == "ok"]
    assert ok == ["logits", "dpo", "sampler", "sampler/eager/4", "sampler/eager/8", "sampler/dense/4",
                  "sampler/dense/8", "sampler/paper_caps/4"], P
    # what needs CUDA (or a long CPU compile) is skipped, and says why
    for k in ("sandbox", "sampler/compiled/4", "sampler/compiled/8"):
        assert P[k]["status"] == "skipped" and P[k]["reason"]
    assert "needs CUDA" in P["sandbox"]["reason"]
    for side in ("right", "left"):
        r = P["logits"]["results"][side]
        assert r["ours_fp32_vs_transformers_fp32"]["max_abs"] <= 1e-4
        assert r["ours_fp32_vs_transformers_fp32"]["top1_agree"] == 1.0
        # bf16: ours is as far from transformers' fp32 logits as transformers' own bf16 is
        ours, theirs = (r[k]["mean_abs"] for k in ("ours_bf16_vs_transformers_fp32",
                                                   "transformers_bf16_vs_transformers_fp32"))
        assert ours <= 2 * theirs + 1e-3
    runs = P["dpo"]["runs"]
    assert set(runs) == {"fused", "full"} and all(r["tokens_per_s"] > 0 for r in runs.values())
    assert runs["fused"]["last_loss"] == pytest.approx(runs["full"]["last_loss"], abs=1e-4)
    for b in (4, 8):
        r = P[f"sampler/eager/{b}"]
        assert r["responses"] == 2 * b and r["ours_tokens_per_s"] > 0 and r["ratio"] > 0
        assert P[f"sampler/dense/{b}"]["lengths"] == r["lengths"], "the same tokens from either cache"
    assert P["sampler/paper_caps/4"]["caps"] == [2048, 4096]
    assert P["sampler/eager/4"]["kv"]["kv_cache"] == "dense", "auto is dense off CUDA"
    md = out.with_suffix(".md").read_text()
    for heading in ("# GPU check: cpu", "## Not measured", "## bf16 logits vs transformers",
                    "## DPO step", "## Sampler vs generate()"):
        assert heading in md
    assert "**sandbox**: skipped: needs CUDA" in md


def test_gpu_check_rejects_an_unknown_part(tmp_path):
    with pytest.raises(gpu_check.ConfigError, match="--parts"):
        gpu_check.main(["--out", str(tmp_path / "x"), "--device", "cpu", "--parts", "logit"])


def test_a_part_that_fails_or_overruns_is_recorded_and_the_next_one_runs(tmp_path):
    import time
    a = gpu_check.GpuCheckArgs(out=str(tmp_path / "gc"))
    rec = gpu_check.Record(a, [], torch.device("cpu"), "small")
    far = time.time() + 60

    def boom():
        raise ValueError("no such kernel")
    gpu_check.run_part(rec, "fails", boom, 10, far)
    gpu_check.run_part(rec, "overruns", lambda: time.sleep(5) or {}, 0.2, far)
    gpu_check.run_part(rec, "late", lambda: {}, 10, time.time() + 1, need=30)
    gpu_check.run_part(rec, "fine", lambda: {"x": 1}, 10, far)
    P = json.loads((tmp_path / "gc.json").read_text())["parts"]
    assert P["fails"]["status"] == "failed"
    assert "ValueError: no such kernel" in P["fails"]["reason"]
    assert P["overruns"]["status"] == "timed out" and P["overruns"]["seconds"] < 2
    assert P["late"]["status"] == "skipped" and "time budget" in P["late"]["reason"]
    assert P["fine"] == {"status": "ok", "x": 1, "seconds": P["fine"]["seconds"]}
    md = (tmp_path / "gc.md").read_text()
    assert "**fails**: failed" in md and "**overruns**: timed out" in md
