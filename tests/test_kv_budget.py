"""The sampler's dense KV cache never asks a GPU for more than its free memory (issue 26, point 2)."""
from mt import sampler
from mt.model import ModelConfig
from mt.sampler import fit_slots


def test_slots_fit_the_free_gpu_memory_at_the_paper_caps():
    """Llama-3-8B in bf16 at 2,048 + 4,096 tokens: 0.75 GiB of K and V a slot, so 128 slots (96 GiB) do not
    fit on an 80 GB H100 beside the 15 GiB of weights; the engine runs the slots that do (the same tokens,
    tests/test_sampler.py's slot invariance)."""
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    per_slot = 2 * 32 * 8 * 128 * 6144 * 2
    assert per_slot == 0.75 * 2 ** 30
    free = int(79.1 * 2 ** 30 - 8.03e9 * 2 - 2 ** 30)  # an H100 less the weights and the CUDA context
    n = fit_slots(cfg, 2, 128, 6144, free)
    assert 60 <= n < 128 and (n + 2) * per_slot <= free - sampler.HEADROOM
    assert fit_slots(cfg, 2, 32, 6144, free) == 32, "what fits is left alone"
    assert fit_slots(cfg, 2, 128, 6144, 0) == 1, "at least one slot"
