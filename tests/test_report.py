"""Report tables on known samples, through runs made in a temporary MLflow store (statistics alone: test_stats.py)."""
from __future__ import annotations

import csv
import math

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats as st

from cifar_ablation.designs import infer_design
from cifar_ablation.identity import table_params
from cifar_ablation.report import load_sweep, main, sweep_run
from cifar_ablation.stats import holm, seeds_to_resolve
from cifar_ablation.tables import build_table, machine_of, markdown, write_csv
from cifar_ablation.tracking import JOB, MEMBER, REPORT, ROLE, SWEEP

ORDER = ["noise", "batchnorm", "dropout"]
SLIDE = {"baseline": "80.2", "noise": "80.9", "batchnorm": "82.0", "flip": "90.7"}


@pytest.fixture
def store(tmp_path, tracking_db):
    client = MlflowClient(f"sqlite:///{tracking_db}")

    def add(experiment: str, runs: dict[tuple, list[float]], design: str = "ladder", sweep: str = "s1",
            failed: dict[tuple, str] | None = None, order: list[str] = ORDER, first_seed: int = 0):
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        for tricks, vals in runs.items():
            for seed, v in enumerate(vals, first_seed):
                r = client.create_run(exp_id, tags={ROLE: JOB, "tricks": ",".join(tricks) or "baseline",
                                                    "design": design, "sweep_id": sweep, "seed": str(seed)})
                client.log_param(r.info.run_id, "ablation.order", str(order))
                for name, acc in SLIDE.items():
                    client.log_param(r.info.run_id, f"ablation.slide.{name}", acc)
                client.log_metric(r.info.run_id, "val_acc", v / 100, step=1)
                client.log_metric(r.info.run_id, "train_acc", (v + 5) / 100, step=1)
                client.set_terminated(r.info.run_id, "FINISHED")
        for tricks, reason in (failed or {}).items():
            r = client.create_run(exp_id, tags={ROLE: JOB, "tricks": ",".join(tricks) or "baseline",
                                                "design": design, "sweep_id": sweep, "failure_reason": reason})
            client.set_terminated(r.info.run_id, "FAILED")
        return exp_id
    return client, add, tmp_path


def test_the_table_says_which_verdicts_could_be_chance_and_what_resolves_the_rest(store):
    """Three comparisons: a gain whose p (about 0.027) passes 5% alone but not Holm's 2 x p, a gain far past it,
    and a difference within noise, which gets the seeds that would resolve it."""
    client, add, tmp = store
    exp = add("holm", {(): [80, 81, 82], ("noise",): [82.8, 83.8, 84.8], ("noise", "batchnorm"): [92.8, 93.8, 94.8],
                       ("noise", "batchnorm", "dropout"): [94.0, 95.0, 94.6]})
    t = build_table(load_sweep(client, exp, "latest")[1])
    _, noise, bn, drop = t.rows
    assert (noise.verdict, bn.verdict, drop.verdict) == ("gain", "gain", "within noise")
    assert 0.025 < noise.p_value < 0.05 and noise.p_holm == pytest.approx(2 * noise.p_value)
    assert bn.p_holm == pytest.approx(3 * bn.p_value) and drop.p_holm == pytest.approx(drop.p_value)  # the largest: x 1
    assert drop.seeds_to_resolve == seeds_to_resolve([94.0, 95.0, 94.6], [92.8, 93.8, 94.8]) and \
        noise.seeds_to_resolve is None    # a verdict already: nothing to resolve
    text = markdown(t, "t")
    assert "may be one of the chance results that 3 tests at 5% make: 1 noise." in text
    assert f"3 dropout: {drop.seeds_to_resolve}." in text
    write_csv(t, tmp / "t.csv")
    rows = list(csv.DictReader(open(tmp / "t.csv")))
    assert float(rows[1]["p_holm"]) == pytest.approx(noise.p_holm) and rows[3]["seeds_to_resolve"] == \
        str(drop.seeds_to_resolve) and rows[0]["p_holm"] == ""


def test_ladder_table_from_runs(store):
    client, add, _ = store
    exp = add("lad", {(): [80, 81, 82], ("noise",): [82, 83, 84], ("noise", "batchnorm"): [90, 91, 92]},
              failed={("noise", "batchnorm", "dropout"): "NonFiniteLoss: train loss is nan"})
    sweep, runs = load_sweep(client, exp, "latest")
    assert sweep == "s1" and len(runs) == 10
    t = build_table(runs)
    assert t.design.name == "ladder" and t.order == ORDER
    assert [r.row for r in t.rows] == ["0 baseline", "1 noise", "2 batchnorm", "3 dropout"]
    base, noise, bn, drop = t.rows
    assert (base.n, base.val_mean, base.verdict, base.slide) == (3, 81.0, "reference", 80.2)
    assert base.train_mean == 86.0 and base.gap == 5.0
    assert noise.delta == 2.0 and noise.verdict == "within noise"
    assert bn.delta == 8.0 and bn.verdict == "gain"
    assert drop.n == 0 and drop.verdict == "missing"
    assert t.missing == ["noise,batchnorm,dropout"]
    assert len(t.ignored) == 1 and "FAILED: NonFiniteLoss" in t.ignored[0]


def test_leave_one_out_and_one_at_a_time(store):
    client, add, _ = store
    exp = add("loo", {tuple(ORDER): [90, 91, 92], ("batchnorm", "dropout"): [89.5, 90.5, 91.5],
                      ("noise", "dropout"): [80, 81, 82]}, design="leave_one_out")
    t = build_table(load_sweep(client, exp, "latest")[1])
    assert [r.row for r in t.rows] == ["all tricks", "without noise", "without batchnorm", "without dropout"]
    assert t.rows[1].delta == 0.5 and t.rows[1].verdict == "within noise"
    assert t.rows[2].delta == 10.0 and t.rows[2].verdict == "gain"   # keeping batchnorm is worth 10
    assert t.rows[3].verdict == "missing" and t.missing == ["noise,batchnorm"]

    exp = add("oaat", {(): [80], ("noise",): [81], ("dropout",): [85]}, design="one_at_a_time")
    t = build_table(load_sweep(client, exp, "latest")[1])
    assert [r.row for r in t.rows] == ["baseline", "+ noise", "+ batchnorm", "+ dropout"]
    assert t.rows[3].delta == 5.0 and t.rows[3].verdict == "n=1: no verdict"
    assert t.rows[2].verdict == "missing"


def test_report_cli_writes_files_and_a_report_run(store, capsys):
    client, add, tmp = store
    add("cli", {(): [80, 81], ("noise",): [81, 82]})
    add("cli2", {(): [70, 71], ("noise",): [75, 76]})
    uri = f"sqlite:///{tmp / 'm.db'}"
    assert main(["--tracking-uri", uri, "--experiment", "cli", "--out", str(tmp / "out")]) == 0
    out = capsys.readouterr().out
    assert "| 1 | noise | 2 | 81.50 ± 0.71 |" in out and "Welch" in out
    assert {p.name for p in (tmp / "out").iterdir()} >= {"ladder.md", "ladder.csv", "ladder_accuracy.png",
                                                        "ladder_train_vs_val.png", "ladder_val_curves.png"}
    exp = client.get_experiment_by_name("cli").experiment_id
    (rep,) = client.search_runs([exp], f"tags.`{ROLE}` = '{REPORT}'")
    assert {a.path for a in client.list_artifacts(rep.info.run_id, "report")} >= {"report/ladder.md",
                                                                                  "report/ladder_accuracy.png"}
    assert main(["--tracking-uri", uri, "--compare", "cli", "cli2", "--out", str(tmp / "out")]) == 0
    out = capsys.readouterr().out
    assert "| 1 noise | 81.50 (2) | 75.50 (2) | -6.00" in out
    # two rows compared (the others have no runs): their p-values adjusted for each other
    ps = [st.ttest_ind(x, y, equal_var=False).pvalue for x, y in (([70, 71], [80, 81]), ([75, 76], [81, 82]))]
    q = holm(ps)
    assert "p (Holm): adjusted for the 2 comparisons" in out
    assert f"| loss | {q[0]:.2g} |" in out and f"| loss | {q[1]:.2g} |" in out
    assert main(["--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_a_sweep_is_named_by_the_start_of_its_id_as_the_progress_lines_print_it(store, capsys):
    client, add, tmp = store
    for sweep, base in (("abc111", 80), ("abc222", 70), ("xyz999", 60)):
        add("ids", {(): [base, base + 1], ("noise",): [base + 1, base + 2]}, sweep=sweep)
    uri, out = f"sqlite:///{tmp / 'm.db'}", ["--out", str(tmp / "o"), "--no-figures"]
    for given, whole, mean in (("xyz", "xyz999", "60.50"), ("abc2", "abc222", "70.50"), ("abc111", "abc111", "80.50")):
        assert main(["--tracking-uri", uri, "--experiment", "ids", "--sweep", given, *out]) == 0
        text = capsys.readouterr().out
        assert f"sweep {whole} (4 runs)" in text and f"| 0 | baseline | 2 | {mean} ± 0.71 |" in text
    assert main(["--tracking-uri", uri, "--experiment", "ids", "--sweep", "abc", *out]) == 2
    assert "error: --sweep abc names 2 sweeps: abc111, abc222; give more of the id" in capsys.readouterr().err


def test_a_missing_reference_makes_its_comparisons_missing(store):
    client, add, _ = store
    exp = add("nobase", {("noise",): [81, 82]}, design="one_at_a_time")
    t = build_table(load_sweep(client, exp, "latest")[1])
    assert t.rows[0].verdict == "missing" and t.rows[0].n == 0          # the baseline itself
    assert t.rows[1].row == "+ noise" and t.rows[1].verdict == "missing"  # nothing to compare with
    assert t.rows[1].val_mean == 81.5 and math.isnan(t.rows[1].delta)


def test_a_long_list_of_missing_configurations_is_cut_to_its_first_twelve(store):
    """A factorial asked of a ladder's runs (--design factorial): 5 tricks, 32 configurations, 6 of them run. The
    table keeps every row; the line under it names the first 12 missing and how many more."""
    client, add, _ = store
    order = ["noise", "batchnorm", "dropout", "flip", "crop"]
    exp = add("longmiss", {tuple(order[:k]): [80 + k, 81 + k] for k in range(6)}, order=order)
    t = build_table(load_sweep(client, exp, "latest")[1], "factorial")
    text = markdown(t, "t")
    assert len(t.rows) == 32 and len(t.missing) == 26 and sum(r.verdict == "missing" for r in t.rows) >= 26
    (line,) = [ln for ln in text.splitlines() if ln.startswith("Missing")]
    assert line.startswith("Missing (no FINISHED run): 26 configurations: [") and line.count("[") == 12
    assert line.endswith("; … and 14 more (each a row marked missing).")


def test_the_slides_numbers_stand_only_beside_the_slides_rungs(store):
    client, add, _ = store
    exp = add("slide", {(): [80, 81], ("noise",): [81, 82]})
    assert [r.slide for r in build_table(load_sweep(client, exp, "latest")[1]).rows] == [80.2, 80.9, 82.0, None]
    exp = add("custom", {(): [80, 81], ("flip",): [85, 86], ("flip", "noise"): [86, 87]}, order=["flip", "noise"])
    t = build_table(load_sweep(client, exp, "latest")[1])
    assert [(r.row, r.slide) for r in t.rows] == [("0 baseline", 80.2), ("1 flip", None), ("2 noise", None)]


def job(client, exp_id: str, tricks: str, seed: int, val: float, params: dict[str, str], sweep: str = "s",
        design: str = "one_at_a_time") -> str:
    """A FINISHED job run as the app logs one: its tags, its (flattened) params, its final metrics."""
    r = client.create_run(exp_id, tags={ROLE: JOB, "tricks": tricks, "design": design, "sweep_id": sweep,
                                        "seed": str(seed)})
    for k, v in {"ablation.order": str(ORDER), "seed": str(seed), **params}.items():
        client.log_param(r.info.run_id, k, v)
    client.log_metric(r.info.run_id, "val_acc", val / 100, step=1)
    client.set_terminated(r.info.run_id, "FINISHED")
    return r.info.run_id


def test_a_group_is_one_configuration_not_a_trick_set(store):
    """Two noise configurations of seed 0 in one experiment are two rows of n=1, never one row of n=2; each is
    compared with the baseline that has its other settings, or says there is none."""
    client, _, _ = store
    exp = client.create_experiment("groups")
    base = {"optim.lr": "0.001", "model.dense": "512"}
    job(client, exp, "baseline", 0, 10.0, {**base, "trick": "{}"})
    job(client, exp, "baseline", 1, 11.0, {**base, "trick": "{}"})
    job(client, exp, "noise", 0, 11.0, {**base, "trick.noise.std": "0.01"})
    job(client, exp, "noise", 0, 13.0, {**base, "optim.lr": "0.01", "trick.noise.std": "0.5"})
    job(client, exp, "noise", 1, 12.0, {**base, "trick.noise.std": "0.01", "seed": "1"})
    t = build_table(load_sweep(client, exp, "all")[1])
    rows = {r.row: r for r in t.rows}
    assert list(rows) == ["baseline", "+ noise (lr=0.001, std=0.01)", "+ noise (lr=0.01, std=0.5)", "+ batchnorm",
                          "+ dropout"]
    same, other = rows["+ noise (lr=0.001, std=0.01)"], rows["+ noise (lr=0.01, std=0.5)"]
    assert (same.n, same.val_mean, same.delta, same.reference) == (2, 11.5, 1.0, "baseline")
    assert (other.n, other.val_mean) == (1, 13.0) and other.verdict == "no reference with the same settings"
    assert t.varied and "vs baseline" in markdown(t, "t")


def test_the_same_seed_twice_is_one_replicate(store):
    client, _, _ = store
    exp = client.create_experiment("twice")
    job(client, exp, "baseline", 0, 10.0, {"trick": "{}"})
    job(client, exp, "baseline", 1, 12.0, {"trick": "{}"})
    newer = job(client, exp, "baseline", 1, 14.0, {"trick": "{}"})   # force=true re-ran seed 1
    t = build_table(load_sweep(client, exp, "all")[1])
    assert (t.rows[0].n, t.rows[0].val_mean) == (2, 12.0)         # seeds 0 and 1 (the newer run of seed 1)
    assert len(t.notes) == 1 and newer in t.notes[0] and "one replicate" in t.notes[0]
    assert "Note: [baseline] seed 1" in markdown(t, "t")


def test_designs_in_other_orders_read_the_runs_they_reuse_in_their_own(store):
    """A ladder over [batchnorm, flip], then one over [flip, batchnorm] (it trains [flip] and a new seed of the
    full set, and reuses the baseline and the first's full set), then a one-at-a-time over [batchnorm, flip] that
    trains nothing: each table follows its own sweep's order (the sweep run's params: the runs it reuses were
    logged with another), and a trick set its runs spell two ways is one configuration."""
    client, _, _ = store
    exp = client.create_experiment("orders")

    def sweep(design: str, order: list[str]) -> str:
        run = client.create_run(exp, tags={ROLE: SWEEP, "design": design}).info.run_id
        client.set_tag(run, "sweep_id", run)
        for k, v in table_params({"order": order, "fraction": None, "slide": {}}).items():
            client.log_param(run, k, v)
        return run

    def trained(sweep_id: str, order: list[str], tricks: str, seed: int, val: float, design: str) -> str:
        return job(client, exp, tricks, seed, val, {"ablation.order": str(order), "trick": "{}"}, sweep=sweep_id,
                   design=design)

    a = sweep("ladder", ["batchnorm", "flip"])
    base, bn, full = (trained(a, ["batchnorm", "flip"], t, 0, v, "ladder")
                      for t, v in (("baseline", 60.0), ("batchnorm", 68.0), ("batchnorm,flip", 70.0)))
    b = sweep("ladder", ["flip", "batchnorm"])
    flip = trained(b, ["flip", "batchnorm"], "flip", 0, 61.0, "ladder")
    trained(b, ["flip", "batchnorm"], "flip,batchnorm", 1, 72.0, "ladder")
    c = sweep("one_at_a_time", ["batchnorm", "flip"])
    for sweep_id, reused in ((b, (base, full)), (c, (base, bn, flip))):
        for run_id in reused:
            client.set_tag(run_id, f"{MEMBER}{sweep_id}", "1")
    tables = {s: build_table(load_sweep(client, exp, s)[1], sweep=sweep_run(client, s)) for s in (a, b, c)}
    assert [(r.row, r.n) for r in tables[b].rows] == [("0 baseline", 1), ("1 flip", 1), ("2 batchnorm", 2)]
    assert tables[b].rows[2].val_mean == 71.0 and tables[b].rows[2].tricks == ("flip", "batchnorm")
    assert [r.row for r in tables[c].rows] == ["baseline", "+ batchnorm", "+ flip"]
    assert [r.row for r in tables[a].rows] == ["0 baseline", "1 batchnorm", "2 flip"]
    assert not any(t.missing or t.extra for t in tables.values())
    pooled = build_table(load_sweep(client, exp, "all")[1], "ladder")   # the newest run's order: [flip, batchnorm]
    assert [(r.row, r.n) for r in pooled.rows] == [("0 baseline", 1), ("1 flip", 1), ("2 batchnorm", 2)]
    assert pooled.extra == ["batchnorm"] and not pooled.missing


def test_attribution_puts_every_designs_answer_side_by_side(store, capsys):
    client, _, tmp = store
    exp = client.create_experiment("attr")
    order = "['batchnorm', 'flip']"
    acc = {(): 60.0, ("batchnorm",): 68.0, ("flip",): 61.0, ("batchnorm", "flip"): 71.0}  # flip helps more with bn
    for design, sets in (("ladder", [(), ("batchnorm",), ("batchnorm", "flip")]),
                         ("one_at_a_time", [(), ("batchnorm",), ("flip",)]),
                         ("factorial", [(), ("flip",), ("batchnorm",), ("batchnorm", "flip")])):
        parent = client.create_run(exp, tags={ROLE: "sweep", "design": design}).info.run_id
        client.set_tag(parent, "sweep_id", parent)
        for s in sets:
            for seed, noise in enumerate((-0.5, 0.5)):
                job(client, exp, ",".join(s) or "baseline", seed, acc[s] + noise,
                    {"ablation.order": order, "trick": "{}"}, sweep=parent, design=design)
    assert main(["--tracking-uri", f"sqlite:///{tmp / 'm.db'}", "--experiment", "attr", "--attribution",
                 "--out", str(tmp / "a")]) == 0
    out = capsys.readouterr().out
    header, _, bn, flip = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert header.startswith("| trick | ladder gain") and "one-at-a-time gain" in header and "Shapley value" in header
    assert bn.startswith("| batchnorm | +8.00 [") and flip.startswith("| flip | +3.00 [")  # the ladder's story
    cells = [c.strip().split(" ")[0] for c in flip.split("|")[2:-1]]
    assert cells == ["+3.00", "+1.00", "–", "+2.00", "+2.00"]   # alone +1, on top of bn +3: they interact
    assert (tmp / "a" / "attribution.md").exists()


@pytest.mark.parametrize("sets, design, order", [
    ([(), ("flip",)], "ladder", ["flip"]),
    ([(), ("noise",), ("noise", "flip"), ("noise", "dropout", "flip")], "ladder", ["noise", "flip", "dropout"]),
    ([("flip",), ("noise", "flip")], "ladder", ["flip", "noise"]),
    ([(), ("noise",), ("flip",)], "one_at_a_time", ["noise", "flip"]),
    ([("noise", "flip"), ("noise",), ("flip",)], "leave_one_out", ["noise", "flip"]),
    ([(), ("noise",), ("flip",), ("noise", "flip")], "factorial", ["noise", "flip"]),
    ([(), ("noise", "flip"), ("dropout",)], "each_vs_baseline", ["noise", "dropout", "flip"]),
])
def test_a_hand_made_sweep_gets_the_design_its_trick_sets_form(sets, design, order):
    d, got, why = infer_design(sets, ["noise", "dropout", "flip"])
    assert (d.name, got) == (design, order) and why
    assert {frozenset(s) for s in d.configs(got)} >= {frozenset(s) for s in sets}  # the rest: "missing"


def test_report_of_a_hand_made_sweep_compares_what_was_swept(store):
    """`-m 'trick=[],[flip]' seed=0,1` then report: both rows, compared, and the inferred design named
    (it was once a ladder table with the baseline only and [flip] 'outside the design')."""
    client, add, _ = store
    add("adhoc", {(): [60, 61], ("flip",): [70, 71]}, design="single")
    add("adhoc2", {(): [60, 61], ("noise",): [62, 63], ("noise", "flip"): [61, 60], ("dropout",): [70, 72]},
        design="single", sweep="s2")
    t = build_table(load_sweep(client, client.get_experiment_by_name("adhoc").experiment_id, "s1")[1])
    assert [(r.tricks, r.verdict) for r in t.rows] == [((), "reference"), (("flip",), "gain")]
    text = markdown(t, "adhoc")
    assert "Design: inferred from the trick sets swept: ladder (nested trick sets" in text
    assert "outside" not in text and not t.missing and not t.extra
    t2 = build_table(load_sweep(client, client.get_experiment_by_name("adhoc2").experiment_id, "s2")[1])
    assert t2.design.name == "each_vs_baseline" and not t2.extra
    assert [r.tricks for r in t2.rows] == [(), ("noise",), ("dropout",), ("noise", "flip")]
    assert {r.tricks: r.reference for r in t2.rows}[("noise", "flip")] == "baseline"


def test_seeds_added_by_a_later_sweep_are_pointed_at_and_pooled_by_sweep_all(store, capsys):
    """The user's follow-up to "within noise": seeds 0-1 in one sweep, seed 2 of the same ladder in another. The
    latest sweep's report (one seed a side, no verdict) says where the others are; --sweep all pools them."""
    client, add, tmp = store
    add("more", {(): [80, 81], ("noise",): [82, 83]}, sweep="s1")
    add("more", {(): [82], ("noise",): [84]}, sweep="s2", first_seed=2)
    uri = client.tracking_uri
    assert main(["--tracking-uri", uri, "--experiment", "more", "--sweep", "s2", "--out", str(tmp / "a"),
                 "--no-figures"]) == 0
    text = (tmp / "a" / "ladder.md").read_text()
    assert "n=1: no verdict" in text and "more seeds of 2 of these 2 configurations (up to 3 in all)" in text
    assert main(["--tracking-uri", uri, "--experiment", "more", "--sweep", "all", "--out", str(tmp / "b"),
                 "--no-figures"]) == 0
    text = (tmp / "b" / "ladder.md").read_text()
    assert "| 1 | noise | 3 | 83.00 ± 1.00 |" in text and "more seeds" not in text
    assert "1 noise: " in text and "within noise" in text    # +2 at a spread of 1: seeds that would resolve it
    assert main(["--tracking-uri", uri, "--experiment", "more", "--sweep", "s1", "--out", str(tmp / "c"),
                 "--no-figures"]) == 0
    assert "(up to 3 in all)" in (tmp / "c" / "ladder.md").read_text()
    # a hand-made sweep (a design inferred from its trick sets, no design of its own) the same way
    add("hand", {(): [80, 81], ("noise", "dropout"): [82, 83]}, design="single", sweep="h1")
    add("hand", {(): [82], ("noise", "dropout"): [84]}, design="single", sweep="h2", first_seed=2)
    assert main(["--tracking-uri", uri, "--experiment", "hand", "--out", str(tmp / "d"), "--no-figures"]) == 0
    text = (tmp / "d" / "each_vs_baseline.md").read_text()
    assert "sweep h2" in text and "more seeds of 2 of these 2 configurations (up to 3 in all)" in text


def test_a_table_says_what_its_runs_trained_on_and_in():
    from types import SimpleNamespace

    def run(**tags):
        return SimpleNamespace(data=SimpleNamespace(tags=tags))
    h100 = run(gpu="NVIDIA H100 80GB HBM3 (compute capability 9.0)", device="cuda:0", precision="bf16 autocast")
    assert machine_of(h100) == "NVIDIA H100 80GB HBM3 (compute capability 9.0), bf16 autocast"
    assert machine_of(run(device="cpu", precision="float32")) == "cpu, float32"
    assert machine_of(run(device="cuda:0")) == "cuda:0"  # a run logged before the gpu and precision tags
    assert machine_of(run()) is None
