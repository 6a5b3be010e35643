"""Finished runs into groups of replicates. A group is one configuration: everything that changes a run's
result but its seed (identity.group_key of its params), with one run per seed. Runs of one trick set that differ
elsewhere (another noise std, another learning rate) are separate groups, labelled by what differs; the same
seed twice is one replicate (the newest run counts, and a note says so).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .identity import group_key


@dataclass
class Group:
    tricks: tuple[str, ...]
    key: tuple[tuple[str, str], ...]      # the configuration: (param, value) pairs, seed and order left out
    runs: list = field(default_factory=list)   # one FINISHED run per seed
    label: str = ""                       # what sets it apart from its trick set's other groups ("std=0.5")

    @property
    def val(self) -> list[float]:
        """Final val accuracy (%) of each seed."""
        return [100 * r.data.metrics["val_acc"] for r in self.runs]

    @property
    def train(self) -> list[float]:
        return [100 * r.data.metrics.get("train_acc", float("nan")) for r in self.runs]

    @property
    def train_mean(self) -> float:
        return statistics.fmean(self.train) if self.runs else float("nan")

    def agrees_with(self, other: "Group") -> bool:
        """Same settings wherever both configurations have the key (tricks in only one of them aside)."""
        mine = dict(self.key)
        return all(mine[k] == v for k, v in other.key if k in mine)


def seed_of(run) -> str:
    return run.data.tags.get("seed") or run.data.params.get("seed") or run.info.run_id


def group_runs(finished: list, trick_sets: list[tuple[str, ...]]) -> tuple[dict[tuple, list[Group]], list[str]]:
    """The groups of each trick set (finished[i] trains trick_sets[i]), labelled, and notes on repeated seeds."""
    by_config: dict[tuple, dict[str, object]] = {}   # (tricks, key) -> seed -> run
    notes: list[str] = []
    for run, tricks in zip(finished, trick_sets):
        seeds = by_config.setdefault((tricks, group_key(run.data.params)), {})
        seed = seed_of(run)
        earlier = seeds.get(seed)
        if earlier is not None:
            newer = max(earlier, run, key=lambda r: r.info.start_time)
            notes.append(f"[{','.join(tricks) or 'baseline'}] seed {seed}: runs {earlier.info.run_id} and "
                         f"{run.info.run_id} hold one configuration and seed; {newer.info.run_id}, the newer, "
                         "counts (a repeated seed is one replicate)")
            run = newer
        seeds[seed] = run
    groups: dict[tuple, list[Group]] = {}
    for (tricks, key), seeds in by_config.items():
        groups.setdefault(tricks, []).append(Group(tricks, key, list(seeds.values())))
    for same in groups.values():
        same.sort(key=lambda g: g.key)  # one order whatever order the store returns runs in
        label(same)
    return groups, notes


def label(groups: list[Group]) -> None:
    """Label each of one trick set's groups by the settings that differ among them: 'std=0.5, lr=0.01'
    (a key's last part, or the whole key where two differing keys share it)."""
    if len(groups) < 2:
        return
    configs = [dict(g.key) for g in groups]
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({c.get(k) for c in configs}) > 1]
    last = [k.split(".")[-1] for k in differ]
    names = [s if last.count(s) == 1 else k for k, s in zip(differ, last)]
    for g, c in zip(groups, configs):
        g.label = ", ".join(f"{n}={c.get(k, '–')}" for k, n in zip(differ, names))
