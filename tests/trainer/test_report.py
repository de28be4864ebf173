"""srpo/report.py: the learning summary over seeds."""
from srpo import report


def _history(evals, lengths):
    recs = [{"step": 0, "eval_accuracy": evals[0]}]
    for step, length in enumerate(lengths, start=1):
        rec = {"step": step, "reward_mean": 0.0, "response_len": length}
        if step in evals:
            rec["eval_accuracy"] = evals[step]
        recs.append(rec)
    return recs


def test_learning_table_gains_are_per_seed_differences():
    runs = {"srpo": [_history({0: 0.25, 2: 0.5, 6: 0.75}, [10, 10, 10, 10, 12, 14]),
                     _history({0: 0.5, 2: 0.5, 6: 0.5}, [8, 8, 8, 8, 8, 8])]}
    row = report.learning_table(runs).splitlines()[1].split()
    assert row[:2] == ["srpo", "2"]
    # step 0: mean 0.375; early gain: 0.25 and 0; final: 0.625; final gain 0.5 and 0; length: last third (2 steps)
    # of each seed, 13 and 8
    values = [float(v) for v in row[2:] if v != "±"]
    assert values == [0.375, 0.177, 0.125, 0.177, 0.625, 0.177, 0.25, 0.354, 10.5, 3.536]
