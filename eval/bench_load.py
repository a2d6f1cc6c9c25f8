"""Host memory of loading a model for training under FSDP2 (mt.checkpoint.load_for_training), per rank.

    torchrun --nproc_per_node 2 eval/bench_load.py                  # a random 125M Llama stored in bf16
    torchrun --nproc_per_node 8 eval/bench_load.py --model DIR      # any Hugging Face directory

Rank 0 alone reads the safetensors and broadcasts them in their stored dtype; every rank keeps its fp32
shard. Reported per rank: the rise in peak RSS (ru_maxrss) over the load, in GiB and as a multiple of the
checkpoint's stored size, beside the fp32 model's size (what a rank would hold if it built the whole fp32
model, as a plain load_model does).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mt import dist  # noqa: E402
from mt.checkpoint import load_for_training, read_config, save_model, weight_files  # noqa: E402
from mt.config import TrainConfig  # noqa: E402
from mt.flags import parse  # noqa: E402
from mt.model import ModelConfig, Transformer  # noqa: E402

GIB = 2 ** 30
LLAMA_125M = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=768,
                  intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", initializer_range=0.02)


@dataclass
class BenchLoadArgs:
    """torchrun ... eval/bench_load.py: host memory per rank of loading a model for FSDP2 training."""
    model: str = ""  # Hugging Face directory; "" = a random 125M Llama stored in bf16
    make: str = ""  # internal: write the random checkpoint to this directory and exit


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def meta_model(path) -> Transformer:
    with torch.device("meta"):  # shapes only
        return Transformer(read_config(path))


def make_random_checkpoint(out: Path) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(dict(LLAMA_125M))).to(torch.bfloat16)
    return save_model(model, out)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv, BenchLoadArgs(), "torchrun --nproc_per_node N eval/bench_load.py", __doc__)
    if a.make:
        return {"made": str(make_random_checkpoint(Path(a.make)))}
    d = dist.init_distributed("cpu")
    torch.set_num_threads(1)
    tmp, path = None, (Path(a.model) if a.model else None)
    if path is None:
        if d.is_main:  # made in a child process, so building it does not count in rank 0's peak RSS
            tmp = tempfile.TemporaryDirectory()
            path = Path(tmp.name) / "llama125m"
            subprocess.run([sys.executable, __file__, "--make", str(path)], check=True)
        path = dist.broadcast_object(path)
    stored = sum(f.stat().st_size for f in weight_files(Path(path))) / GIB
    n_params = sum(p.numel() for p in meta_model(path).parameters())
    dist.barrier()
    before = peak_rss_gib()
    model = load_for_training(path, TrainConfig(), fsdp=True)
    dist.barrier()
    rise = peak_rss_gib() - before
    rows = dist.gather_objects({"rank": d.rank, "rise_gib": round(rise, 3), "x_stored": round(rise / stored, 2)})
    res = {"model": str(a.model or "random llama 125M, bf16"), "params_m": round(n_params / 1e6, 1),
           "stored_gib": round(stored, 3), "fp32_model_gib": round(4 * n_params / GIB, 3), "world": d.world_size,
           "ranks": rows}
    dist.print0(json.dumps(res))
    del model
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    dist.run(main)  # a user error: one `error: ...` line, exit status 2
