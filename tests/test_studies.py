"""tools/compare_routers.py / selfmoe.studies: a real 2-router x 2-seed study of a tiny GPT.

Every cell of the report is compared with the runs' TensorBoard scalars read here independently
(tensorboard's raw EventFileLoader, not the EventAccumulator the tool uses); resuming re-runs only
what is missing; the PNGs exist; bad input is one line and exit code 2.
"""

import csv
import glob
import io
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from selfmoe import studies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from compare_routers import main  # noqa: E402
SCRIPT = os.path.join(REPO, "pretrain_gpt.py")
ITERS = 4
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", "32", "--mock-data", "--vocab-size", "512", "--micro-batch-size", "4",
        "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "2", "--eval-interval", "2",
        "--eval-iters", "1", "--disable-bias-linear"]
ROUTERS = ["learned", "dense"]
SEEDS = [1, 2]


def tb_scalars(folder):
    """{tag: {step: value}} from the raw event records; a step logged again (after a resume) takes
    the later record."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    records = []
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    records.append((event.wall_time, v.tag, event.step, float(tensor_util.make_ndarray(v.tensor))))
    out = {}
    for _, tag, step, value in sorted(records, key=lambda r: r[0]):
        out.setdefault(tag, {})[step] = value
    return out


def last(series):
    return series[max(series)] if series else None


def expected_run(folder):
    """The numbers one run contributes to the report, straight from its TensorBoard scalars."""
    s = tb_scalars(folder)
    rates = sorted(s["throughput/tokens-per-sec"].values())
    mid = len(rates) // 2
    return {
        "val_loss": last(s["lm loss validation"]), "val_ppl": last(s["lm loss validation ppl"]),
        **{k: last(s.get(f"routing/{k}", {})) for k in studies.ROUTING_KEYS},
        "router_params": s["parameters/router"][0], "active_params": s["parameters/active"][0],
        "throughput": rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2,
        "iteration": max(s["lm loss validation"]),
    }


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_report_against_tensorboard(report_dir, run_dirs):
    rows = {r["router"]: r for r in read_csv(os.path.join(report_dir, "report.csv"))}
    assert sorted(rows) == sorted(ROUTERS)
    expected = {r: [expected_run(os.path.join(run_dirs, f"{r}-s{s}", "tensorboard")) for s in SEEDS]
                for r in ROUTERS}
    checked = 0
    for router, runs in expected.items():
        row = rows[router]
        assert row["seeds"] == " ".join(map(str, SEEDS)) and int(row["runs"]) == len(SEEDS)
        for col in studies.metric_columns("tokens"):
            values = [run[col] for run in runs]
            if router == "dense" and col in studies.ROUTING_KEYS:
                assert values == [None, None] and row[f"{col}_mean"] == row[f"{col}_std"] == ""
                continue
            assert float(row[f"{col}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12), (router, col)
            sd = math.sqrt(sum((v - statistics.fmean(values)) ** 2 for v in values) / (len(values) - 1))
            assert float(row[f"{col}_std"]) == pytest.approx(sd, rel=1e-9, abs=1e-12), (router, col)
            checked += 2
    learned = statistics.fmean(r["throughput"] for r in expected["learned"])
    for router in ROUTERS:
        mean = statistics.fmean(r["throughput"] for r in expected[router])
        assert float(rows[router]["throughput_vs_learned"]) == pytest.approx(mean / learned, rel=1e-12)
    assert checked == 2 * 9 + 2 * 5  # every numeric cell of both rows
    return rows, expected


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    s = studies.make_study(SCRIPT, BASE, ROUTERS, SEEDS, out, train_iters=ITERS)
    log = io.StringIO()
    result = studies.run_study(s, out=log)
    assert result == {"launched": [f"{r}-s{seed}" for seed in SEEDS for r in ROUTERS], "failed": []}, log.getvalue()
    report = studies.study_report(s)
    return s, report, log.getvalue()


def test_report_cells_equal_the_tensorboard_scalars(study):
    s, report, log = study
    rows, expected = check_report_against_tensorboard(os.path.join(s.output, "report"), os.path.join(s.output, "runs"))
    # the runs are really what the study says: every run reached the budget; dense has no router and
    # the active parameters of the MoE run minus its router (k experts of width 32 = one FFN of 64)
    for router in ROUTERS:
        assert [r["iteration"] for r in expected[router]] == [ITERS, ITERS]
    assert expected["dense"][0]["router_params"] == 0 and expected["learned"][0]["router_params"] == 4 * 32 * 2
    assert expected["dense"][0]["active_params"] == expected["learned"][0]["active_params"] - 4 * 32 * 2
    assert float(rows["learned"]["experts_per_token_mean"]) == 2.0
    # the seeds differ (init and data order), so the runs are not copies of one another
    assert expected["learned"][0]["val_loss"] != expected["learned"][1]["val_loss"]
    # per-run table: one row per run with its own TensorBoard numbers
    per_run = read_csv(os.path.join(s.output, "report", "runs.csv"))
    assert len(per_run) == 4
    for r in per_run:
        e = expected_run(r["path"])
        assert float(r["val_loss"]) == pytest.approx(e["val_loss"], rel=1e-12)
    assert "study: 4/4 runs done | 100% of iterations" in log
    md = open(os.path.join(s.output, "report", "report.md")).read()
    assert "| learned | 1 2 |" in md and "--ffn-hidden-size 64" in md


def test_plots_are_written(study):
    import matplotlib.image as mpimg

    s, report, _ = study
    assert sorted(report["plots"]) == ["entropy.png", "expert_load.png", "validation.png"]
    for name in report["plots"]:
        path = os.path.join(s.output, "report", name)
        assert os.path.getsize(path) > 2000
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # not a blank canvas


def test_heatmap_reads_the_logged_load_fractions(study):
    s, _, _ = study
    log = studies.read_run(os.path.join(s.output, "runs", "learned-s1", "tensorboard"))
    grid, layers = log.load_fractions()
    assert layers == [1, 2] and all(len(row) == 4 for row in grid)
    for row in grid:  # each MoE layer's fractions of its routed (token, expert) pairs
        assert sum(row) == pytest.approx(1.0, abs=1e-6)
    raw = tb_scalars(os.path.join(s.output, "runs", "learned-s1", "tensorboard"))
    assert grid[1][3] == last(raw["routing/load_fraction/layer_2/expert_3"])


def test_from_tensorboard_builds_the_same_table(study, tmp_path):
    s, _, _ = study
    assert main(["--from-tensorboard", os.path.join(s.output, "runs"), "--output", str(tmp_path / "r")]) == 0
    by_router = lambda path: {r["router"]: r for r in read_csv(path)}  # noqa: E731
    assert by_router(tmp_path / "r" / "report.csv") == by_router(os.path.join(s.output, "report", "report.csv"))


def test_from_tensorboard_leaves_out_unfinished_runs(study, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    s, _, _ = study
    shutil.copytree(os.path.join(s.output, "runs", "learned-s1", "tensorboard"), tmp_path / "runs" / "a")
    w = SummaryWriter(str(tmp_path / "runs" / "b"))  # a run stopped at iteration 4 of 10
    for name, value in (("train_iters", "10"), ("seed", "5"), ("num_experts", "4"), ("moe_router_type", "self")):
        w.add_text(name, value, 0)
    w.add_scalar("lm loss validation", 6.0, 4)
    w.add_scalar("throughput/tokens-per-sec", 100.0, 4)
    w.close()
    assert main(["--from-tensorboard", str(tmp_path / "runs"), "--output", str(tmp_path / "r")]) == 0
    assert [r["router"] for r in read_csv(tmp_path / "r" / "report.csv")] == ["learned"]
    assert f"not finished, left out: {tmp_path / 'runs' / 'b'} (validation at iteration 4 of 10)" in \
        open(tmp_path / "r" / "report.md").read()


def test_emit_launch_lines(study, capsys):
    s, _, _ = study
    os.remove(os.path.join(s.output, "runs", "dense-s2", "done.json"))  # finished runs print nothing...
    assert main(["--script", SCRIPT, "--routers", ",".join(ROUTERS), "--seeds", "1,2", "--train-iters", str(ITERS),
                 "--output", s.output, "--emit-launch", "--", *BASE]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert os.path.isfile(os.path.join(s.output, "runs", "dense-s2", "done.json"))  # ...and a run with its final
    assert lines == []  # checkpoint and final validation logged counts as finished (marker written again)
    fresh = studies.make_study(SCRIPT, BASE, ["dense", "routing-free"], [7], s.output + "-other", train_iters=ITERS)
    dense, rf = (fresh.launch_line(r) for r in fresh.runs())
    assert dense.startswith("torchrun --nproc-per-node 1 ") and "--num-experts 0 --ffn-hidden-size 64" in dense
    assert "--seed 7" in dense and f"--load {fresh.output}/runs/dense-s7/checkpoints" in dense
    assert "--moe-router-type routing-free --routing-free-density-target 0.5" in rf


def test_resume_reruns_only_what_is_missing(study):
    s, _, _ = study
    runs = os.path.join(s.output, "runs")
    before = expected_run(os.path.join(runs, "learned-s2", "tensorboard"))
    # learned-s2 was killed after its mid-run checkpoint: no marker, the last checkpoint is iteration 2
    os.remove(os.path.join(runs, "learned-s2", "done.json"))
    shutil.rmtree(os.path.join(runs, "learned-s2", "checkpoints", "iter_0000004"))
    with open(os.path.join(runs, "learned-s2", "checkpoints", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    # dense-s1 lost only its marker: its checkpoint is final and its logs hold the final validation
    os.remove(os.path.join(runs, "dense-s1", "done.json"))
    log = io.StringIO()
    result = studies.run_study(s, out=log)
    assert result == {"launched": ["learned-s2"], "failed": []}, log.getvalue()
    assert "learned-s2: start from iteration 2" in log.getvalue()
    assert "loaded checkpoint" in open(os.path.join(runs, "learned-s2", "train.log")).read()
    assert os.path.isfile(os.path.join(runs, "dense-s1", "done.json"))
    # the resumed run ends where the uninterrupted one did (same data position, RNG, optimizer)
    after = expected_run(os.path.join(runs, "learned-s2", "tensorboard"))
    assert len(glob.glob(os.path.join(runs, "learned-s2", "tensorboard", "events.*"))) == 2
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-6)
    report_dir = os.path.join(s.output, "report-resumed")
    studies.write_report([studies.read_run(os.path.join(runs, f"{r}-s{seed}", "tensorboard"))
                          for seed in SEEDS for r in ROUTERS], report_dir, "resumed")
    check_report_against_tensorboard(report_dir, runs)


@pytest.mark.parametrize("argv, message", [
    (["gpt-demo", "--routers", "learned,topk"], "--routers: unknown router 'topk'"),
    (["--script", "nowhere/pretrain_gpt.py"], "--script: no such file nowhere/pretrain_gpt.py"),
    (["--script", "train.py"], "--script must be one of"),
    (["llama-demo"], "unknown recipe 'llama-demo'"),
    (["gpt-demo", "--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    (["gpt-demo", "--", "--seed", "3"], "--seed is set per run by the study"),
    (["gpt-demo", "--train-iters", "5", "--train-tokens", "9"], "give one budget"),
    (["--from-tensorboard", "/nonexistent/runs"], "--from-tensorboard: no such folder /nonexistent/runs"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main(["--output", str(tmp_path / "s")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "s")  # nothing written


def test_a_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(studies.StudyError, match="holds no study .* not empty"):
        studies.make_study(SCRIPT, BASE, ROUTERS, SEEDS, str(tmp_path / "mine"), train_iters=ITERS)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert studies.make_study(SCRIPT, BASE, ROUTERS, SEEDS, str(tmp_path / "empty"), train_iters=ITERS)


def test_other_settings_in_the_same_folder_are_refused(study, capsys):
    s, _, _ = study
    with pytest.raises(studies.StudyError, match="holds a study with another train_iters"):
        studies.make_study(SCRIPT, BASE, ROUTERS, SEEDS, s.output, train_iters=ITERS + 1)


def test_command_line_exit_code():
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "compare_routers.py"), "gpt-demo",
                        "--routers", "learned,nope", "--output", "unused"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --routers: unknown router")


def test_claim_verdicts():
    def row(router, ppl, sd, ent=0.9):
        return {"router": router, "val_ppl_mean": ppl, "val_ppl_std": sd, "normalized_entropy_mean": ent,
                "normalized_entropy_std": sd and 0.01}

    rows = [row("learned", 100.0, 1.0), row("self", 103.0, 1.0, ent=1.0), row("random", 101.0, 1.0),
            row("hash", 95.0, 1.0), row("routing-free", 90.0, None)]
    for r in rows:
        r["experts_per_token_mean"] = 2.0
    got = {c: (m, v) for c, m, p, v in studies.claims(rows, "tokens")}
    assert got["Self-Routing vs learned: validation PPL"] == ("+3.0% (103.000 ± 1.000 vs 100.000 ± 1.000)", "yes")
    assert got["Self-Routing vs learned: normalized routing entropy"][1] == "yes"  # +11%, beyond 0.02
    assert got["random vs learned: validation PPL"][1] == "within noise"  # +1 < 1 + 1
    assert got["hash vs learned: validation PPL"][1] == "no"  # the paper says worse; here better
    assert got["Routing-Free vs learned top-k, matched density: validation PPL"][1].startswith("same direction")
    rows[1]["val_ppl_mean"] = 99.5  # opposite to the paper, by less than the noise
    rows[4]["experts_per_token_mean"] = 8.0  # Routing-Free missed its density target
    got = {c: v for c, m, p, v in studies.claims(rows, "tokens")}
    assert got["Self-Routing vs learned: validation PPL"] == "no (opposite sign, within noise)"
    assert "Routing-Free vs learned top-k: validation PPL (NOT matched: 8.00 vs 2.00 experts/token)" in got


def test_router_flags_match_active_compute_and_density():
    """Dense: one FFN of k x expert width; Routing-Free: density target k/E and the demo's fast lambda
    controller (the paper's would leave a study-length run dense); the user's own flags win."""
    from selfmoe.studies import Study

    def flags(router, base=()):
        s = Study(script="pretrain_gpt.py", base_flags=list(base), routers=[router], seeds=[1], output="/tmp/unused",
                  train_iters=10, num_experts=8, topk=2, expert_width=64)
        f = s.router_flags(router)
        return dict(zip(f[::2], f[1::2]))

    assert flags("dense") == {"--num-experts": "0", "--ffn-hidden-size": "128"}
    rf = flags("routing-free")
    assert rf["--routing-free-density-target"] == "0.25"
    assert (rf["--routing-free-eta"], rf["--routing-free-lambda0"]) == ("0.1", "0.001")
    own = flags("routing-free", ["--routing-free-eta", "0.3", "--routing-free-density-target", "0.5"])
    assert "--routing-free-eta" not in own and "--routing-free-density-target" not in own
    assert "--routing-free-eta" not in flags("routing-free", ["--routing-free-preset", "reference"])
