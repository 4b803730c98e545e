"""Smoke test of bench/mixing_known_optimum.py: --quick --tiny runs and ends with the JSON it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("optimum", "uniform", "natural", "doremi", "doremi_uniform_ref", "mixing_law", "mixing_law_avg")


def _bench_module():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        import mixing_known_optimum
    finally:
        sys.path.pop(0)
    return mixing_known_optimum


def test_banded_domains_emit_only_their_own_band_and_transfer_shares_the_targets(tmp_path):
    import pyarrow.parquet as pq

    bench = _bench_module()
    hmms, offsets, n_symbols = bench.make_domains(0, 4, "banded")
    paths = bench.write_corpus(str(tmp_path), (hmms, offsets, n_symbols), 16,
                               {"markov": 8, "noise": 8, "small": 2, "transfer": 8}, 4, 0)
    seen = {}
    for shard in tmp_path.glob("shards/*/*.parquet"):
        ids = np.concatenate(pq.read_table(shard).column("input_ids").to_numpy(zero_copy_only=False))
        name = shard.parent.name
        seen[name] = seen.get(name, set()) | set(ids.tolist())
    bands = {name: set(range(offsets[name], offsets[name] + bench.BAND)) for name in seen}
    for name, ids in seen.items():
        assert ids <= bands[name], name
    assert bands["transfer"] == bands["target"]
    others = [bands[d] for d in ("markov", "noise", "small", "transfer")]
    assert all(not (a & b) for i, a in enumerate(others) for b in others[i + 1:])  # disjoint bands
    manifest = json.loads(open(paths["train"]).read())
    assert manifest["tokenizer"]["vocab_size"] == n_symbols + 2 == 4 * bench.BAND + 2
    assert manifest["tokenizer"]["special_ids"] == {"pad": n_symbols, "mask": n_symbols + 1}

    hmms, offsets, n_symbols = bench.make_domains(0, 4, "shared")
    assert set(offsets.values()) == {0} and n_symbols == bench.N_SYMBOLS
    with pytest.raises(ValueError, match="scenario"):
        bench.make_domains(0, 4, "nonsense")


def test_junk_scenario_is_banded_plus_a_fifth_near_random_domain_in_its_own_band(tmp_path):
    bench = _bench_module()
    banded, _, _ = bench.make_domains(3, 4, "banded")
    hmms, offsets, n_symbols = bench.make_domains(3, 4, "junk")
    assert set(hmms) == set(banded) | {"junk"}
    for name, hmm in banded.items():  # the four banded domains and the target are drawn as in banded
        np.testing.assert_array_equal(hmms[name].emission, hmm.emission)
        np.testing.assert_array_equal(hmms[name].transition, hmm.transition)

    def entropy(hmm):  # mean entropy of the emission rows (nats)
        e = np.clip(hmm.emission, 1e-12, 1)
        return float(-(e * np.log(e)).sum(axis=1).mean())

    # junk is as near-random as noise (close to log 16 = 2.77 nats), the learnable domains are sharp
    assert entropy(hmms["junk"]) > 2.6 and entropy(hmms["noise"]) > 2.6
    assert max(entropy(hmms[d]) for d in ("markov", "small", "transfer")) < 2.0
    bands = {name: set(range(off, off + bench.BAND)) for name, off in offsets.items()}
    assert bands["transfer"] == bands["target"]
    training = [bands[d] for d in ("markov", "noise", "junk", "small", "transfer")]
    assert all(not (a & b) for i, a in enumerate(training) for b in training[i + 1:])
    assert n_symbols == 5 * bench.BAND

    paths = bench.write_corpus(str(tmp_path), (hmms, offsets, n_symbols), 16,
                               {"markov": 8, "noise": 8, "junk": 8, "small": 2, "transfer": 8}, 4, 0)
    manifest = json.loads(open(paths["train"]).read())
    assert set(manifest["domains"]) == {"markov", "noise", "junk", "small", "transfer"}
    assert manifest["tokenizer"]["vocab_size"] == 5 * bench.BAND + 2


@pytest.mark.slow
@pytest.mark.parametrize("scenario,extra", [("banded", []), ("shared", []),
                                            ("junk", ["--excess-ema", "0.9", "--doremi-batch-scale", "2",
                                                      "--doremi-steps", "9"])])
def test_mixing_known_optimum_tiny_prints_its_json(scenario, extra):
    result = subprocess.run([sys.executable, "bench/mixing_known_optimum.py", "--quick", "--tiny",
                             "--scenario", scenario, *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bench"] == "mixing_known_optimum" and out["scenario"] == scenario
    n_domains = 5 if scenario == "junk" else 4
    assert all(len(w) == n_domains for w in out["weights"].values())
    scale = 2 if extra else 1
    assert out["doremi_batch_scale"] == scale and out["doremi_excess_ema"] == (0.9 if extra else 0.0)
    # one round: reference + proxy, each doremi_steps steps of scale times the scored runs' batch
    assert out["doremi_steps"] == (9 if extra else out["steps"])
    assert out["budget"]["doremi"] == out["budget"]["doremi_uniform_ref"] == scale * 2 * out["doremi_steps"]
    assert [len(out["doremi_split_half"][m]) for m in ("doremi", "doremi_uniform_ref")] == [1, 1]  # one per round
    assert all(0.0 <= d <= 1.0 for m in ("doremi", "doremi_uniform_ref") for d in out["doremi_split_half"][m])
    for key in ("regret", "gap_uniform_to_optimum", "budget", "optimum_weights", "weights"):
        assert key in out, key
    assert set(out["regret"]) == set(METHODS) and set(out["budget"]) == set(METHODS)
    assert all(math.isfinite(v) for v in out["regret"].values())
    assert out["regret"]["optimum"] == 0.0
    assert out["gap_uniform_to_optimum"] == out["regret"]["uniform"]
    assert out["budget"]["uniform"] == out["budget"]["natural"] == 0
    assert out["budget"]["doremi"] > 0 and out["budget"]["mixing_law"] > 0
    for m in METHODS:  # every training domain counts in the _all_domains figures, the learnable ones in the others
        assert out["worst_loss_all_domains"][m] >= out["worst_loss"][m]
        assert out["worst_loss_all_domains"][m] >= out["average_loss_all_domains"][m] > 0
    for weights in [out["optimum_weights"], *out["weights"].values()]:
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
        assert min(weights.values()) >= -1e-9


def test_across_seeds_pairs_each_method_with_uniform_by_seed():
    bench = _bench_module()

    def run(seed, uniform, doremi):
        losses = {"optimum": 1.0, "uniform": uniform, "doremi": doremi}
        return {"seed": seed, "scenario": "banded", "wall_s": 1.0, "budget": {"optimum": 0, "uniform": 0, "doremi": 600},
                "gap_uniform_to_optimum": uniform - 1.0, "regret": {m: v - 1.0 for m, v in losses.items()},
                "target_loss": losses, "average_loss": losses, "worst_loss": {m: v + 1 for m, v in losses.items()}}

    runs = [run(0, 2.0, 1.9), run(1, 3.0, 3.2), run(2, 2.5, 2.4)]
    for r, last in zip(runs[1:], (0.05, 0.3)):  # seed 0's summary predates the split-half record
        r["doremi_split_half"] = {"doremi": [0.9, last], "doremi_uniform_ref": [last / 2]}
    out = bench.across_seeds(runs)
    assert out["doremi_split_half"] == {"doremi": [0.05, 0.3], "doremi_uniform_ref": [0.025, 0.15]}  # last rounds
    diff = out["versus_uniform"]["doremi"]["average_loss"]
    assert diff["per_seed"] == pytest.approx([-0.1, 0.2, -0.1])  # paired: each seed's own uniform
    assert diff["mean"] == pytest.approx(0.0) and diff["sd"] == pytest.approx(np.std([-0.1, 0.2, -0.1], ddof=1))
    assert diff["below_uniform"] == 2
    assert out["versus_uniform"]["uniform"]["worst_loss"]["below_uniform"] == 0
    assert out["regret"]["doremi"] == pytest.approx((0.9 + 2.2 + 1.4) / 3)
    assert out["gap_uniform_to_optimum"] == pytest.approx(1.5) and out["seeds"] == [0, 1, 2]
