"""The multi-seed table and the claim it allows: mean and spread per method, 'better' only beyond the spread."""

from __future__ import annotations

from gradproj.bench.seeds import pareto_table, seeds_table, verdict


def _rec(method: str, seed: int, ppl: float, lr: float = 0.01, step: float = 0.1) -> dict:  # type: ignore[type-arg]
    return {"method": method, "val_ppl": ppl, "diverged": False, "lr_matrix": lr, "lr_other": 0.03,
            "state_bytes": 2**20, "step_seconds_median": step, "config": {"seed": seed}}  # fmt: skip


def test_overlapping_seeds_make_no_claim() -> None:
    records = [_rec("alice", s, p) for s, p in enumerate((95.0, 99.0, 97.0))]
    records += [_rec("galore-torch", s, p) for s, p in enumerate((98.0, 100.0, 99.0))]
    assert verdict(records).endswith("the seeds overlap, so neither is better at this budget.")
    assert "alice leads the best peer, galore-torch, by 2.0%" in verdict(records)


def test_one_seed_makes_no_claim_and_a_peer_ahead_is_said_so() -> None:
    assert verdict([_rec("alice", 0, 90.0), _rec("fira", 0, 95.0)]).endswith("one seed each: no claim either way.")
    ahead = [_rec("alice", s, 100.0 + s) for s in range(3)] + [_rec("fira", s, 90.0 + s) for s in range(3)]
    assert verdict(ahead).startswith("the best peer, fira, leads alice by")


def test_table_shows_each_method_at_its_best_rates_with_mean_range_and_step_ratio() -> None:
    records = [_rec("adamw", s, 110.0 + s, lr=1e-3, step=0.2) for s in range(3)]
    records += [_rec("alice", s, 90.0 + s, step=0.21) for s in range(3)]
    records += [_rec("alice", s, 120.0, lr=0.1) for s in range(3)]  # a worse rate: not shown
    records += [_rec("galore-torch", s, 100.0) for s in range(2)]
    rows = seeds_table(records).splitlines()[2:]
    assert rows[0] == "| alice | 3 | 91.00 | 90.00 - 92.00 | 0.910 | 0.01 / 0.03 | 1.00 | 210.0 | 1.05 |"
    assert rows[1].startswith("| galore-torch (peer) | 2 | 100.00 |") and len(rows) == 3


def test_pareto_table_orders_by_state_and_marks_the_frontier() -> None:
    def rec(method: str, seed: int, ppl: float, mib: float) -> dict:  # type: ignore[type-arg]
        return {**_rec(method, seed, ppl), "state_bytes": int(mib * 2**20)}

    records = [rec("adamw", s, 100.0 + s, 40) for s in range(3)]  # most state, best: on the frontier
    records += [rec("galore_adamw", s, 104.0 + s, 20) for s in range(3)]  # least state: on it
    records += [rec("alice", s, 110.0 + s, 25) for s in range(3)]  # more state and worse than GaLore, apart
    records += [rec("cosmos", s, 101.0 + 5 * s, 30) for s in range(3)]  # mean 106 > GaLore's, ranges overlap
    rows = pareto_table(records).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| galore_adamw", "| alice", "| cosmos", "| adamw"]
    assert rows[0].endswith("| yes |") and rows[3].endswith("| yes |")
    assert rows[1].endswith("| no (galore_adamw) |")
    assert rows[2].endswith("| no (galore_adamw; overlapping seeds) |")
