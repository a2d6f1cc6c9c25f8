"""eval/bench_trl.py without TRL installed (one user error naming the install), and its pure
helpers (our pairs as TRL's tokenized columns for DPO and the RM, the tokens each pair puts
through the model, the order TRL takes them in, its padding, the table) on hand values. The
benchmark itself needs `pip install trl` and is run by hand; nothing here times."""
import subprocess
import sys
from pathlib import Path

import pytest

from eval import bench_trl
from eval.bench_train import examples
from mt.chat import Example
from mt.train import global_batches
from mt.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [[], ["--objective", "rm", "--lengths", "ultrafeedback",
                                        "--layout", "padded"]])
def test_without_trl_one_user_error_before_any_work(monkeypatch, tmp_path, flags):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails, installed or not
    monkeypatch.setattr(bench_trl, "build_model",
                        lambda *a: pytest.fail("built a model although TRL is missing"))
    out = tmp_path / "r.json"
    with pytest.raises(UserError, match=r"TRL is not importable.*Fix: pip install trl$"):
        bench_trl.main(["--out", str(out), *flags])
    assert not out.exists()


def test_without_trl_the_command_exits_2_with_one_error_line():
    code = ("import runpy, sys; sys.modules['trl'] = None; sys.argv = ['eval/bench_trl.py']; "
            "runpy.run_path('eval/bench_trl.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("Fix: pip install trl"), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_trl_rows_and_pair_tokens_hand_value():
    e = Example("k0", "p0", (1, 2, 3, 4, 5), 3, (1, 2, 3, 6), 3)
    rows = bench_trl.trl_rows([e])
    assert rows == {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5]], "rejected_ids": [[6]]}
    # rows [1 2 3 4 5] and [1 2 3 6]: the prompt counts in both
    assert bench_trl.pair_tokens(rows) == [9] == [e.num_tokens]


def test_trl_rows_refuses_pairs_without_one_shared_prompt():
    with pytest.raises(ValueError, match="k1.*one prompt"):
        bench_trl.trl_rows([Example("k1", "p", (1, 2, 3), 2, (1, 9, 3), 2)])
    with pytest.raises(ValueError, match="k2"):
        bench_trl.trl_rows([Example("k2", "p", (1, 2, 3), 2, (1, 2, 3), 1)])


def test_the_benchmark_pairs_as_trl_rows():
    pairs = examples(2, 8, 50)  # seq 8: prompt 2, responses 6 each
    rows = bench_trl.trl_rows(pairs)
    assert [len(x) for x in rows["prompt_ids"]] == [2, 2]
    assert [len(x) for x in rows["chosen_ids"] + rows["rejected_ids"]] == [6] * 4
    for e, p, c, r in zip(pairs, rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
        assert tuple(p + c) == e.chosen and tuple(p + r) == e.rejected
    assert bench_trl.pair_tokens(rows) == [16, 16]  # 2 × seq: two rows of 8


def test_table_lists_each_repeat_then_the_medians():
    def run(impl, rep, tps, mem):
        return {"impl": impl, "repeat": rep, "tokens_per_s": tps, "seconds_per_step": 1000 / tps,
                "step_memory_gib": mem}
    runs = [run("ours", 1, 100.0, 0.5), run("trl", 1, 50.0, 1.0), run("ours", 2, 300.0, 0.25),
            run("trl", 2, 60.0, 2.0), run("ours", 3, 200.0, 0.75), run("trl", 3, 40.0, 1.5)]
    lines = bench_trl.table(runs).splitlines()
    assert lines[2] == "| 1 | 100 | 50 | 2.00 | 10.000 | 20.000 | 0.500 | 1.000 |"
    assert lines[3] == "| 2 | 300 | 60 | 5.00 | 3.333 | 16.667 | 0.250 | 2.000 |"
    # medians per column: 200 and 50 tokens/s, 5 and 20 s/step, 0.5 and 1.5 GiB
    assert lines[-1] == "| median | 200 | 50 | 4.00 | 5.000 | 20.000 | 0.500 | 1.500 |"
    assert len(lines) == 6


def test_rm_rows_are_whole_sequences_and_count_the_same_tokens():
    e = Example("k0", "p0", (1, 2, 3, 4, 5), 3, (1, 2, 3, 6), 3)
    rows = bench_trl.trl_rows([e], "rm")
    assert rows == {"chosen_ids": [[1, 2, 3, 4, 5]], "rejected_ids": [[1, 2, 3, 6]]}
    assert bench_trl.row_lengths(rows) == bench_trl.row_lengths(bench_trl.trl_rows([e])) == [(5, 4)]
    assert bench_trl.pair_tokens(rows) == [9]


def test_step_order_is_our_steps_longest_first_within_each():
    tokens = [5, 9, 7, 3, 8, 6]
    order = bench_trl.step_order(tokens, 2, 1)
    steps = global_batches(6, 2, 1, 0)  # what mt/train.py's loop takes, step by step
    assert [sorted(order[s:s + 2]) for s in (0, 2, 4)] == [sorted(b) for b in steps]
    assert all(tokens[order[s]] >= tokens[order[s + 1]] for s in (0, 2, 4))


def test_padded_fraction_pads_both_rows_of_a_micro_batch_to_its_longest():
    lengths = [(4, 2), (3, 3), (1, 1)]
    # micro 2 over pairs 0, 1: 4 rows of 4 = 16 positions for 12 tokens; then pair 2: 2 of 1
    assert bench_trl.padded_fraction(lengths, [0, 1, 2], 2) == pytest.approx(1 - 14 / 18)
    assert bench_trl.padded_fraction([(3, 3)], [0], 1) == 0.0
