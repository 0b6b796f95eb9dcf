"""Router studies: one base launch trained once per (router, seed), and one report from their logs.

A study is a folder:

    STUDY/study.json                     script, base flags and budget (a later call must match them)
    STUDY/runs/<router>-s<seed>/         per run: command.txt, train.log, checkpoints/, tensorboard/,
                                         done.json (written atomically when the run reached its last iteration)
    STUDY/report/                        report.md, report.csv, runs.csv, validation.png, entropy.png,
                                         expert_load.png

Every run gets the same base flags, seed-for-seed the same data order, batch and schedule, and
the same active parameters per token: the MoE routers share the base's experts (E, k, expert
width); Routing-Free gets the density target k/E; dense gets an FFN of width k x expert width
(matched active FLOPs, not matched total width). The learned router gets Megatron's usual
aux-loss coefficient 1e-2 and Self-Routing none (the Self-Routing paper's setup), unless the base
flags set one. A run whose done.json exists is not started again; any other run is started with
--load on its own checkpoint folder, so a killed run resumes from its last checkpoint.

Every number of the report is read back from the runs' TensorBoard event files (tensorboard's
EventAccumulator), so `report_from_tensorboard` gives the same report for runs made elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from selfmoe.training.checkpointing import write_atomically

ROUTERS = ("dense", "learned", "self", "random", "hash", "routing-free")
SCRIPTS = ("pretrain_gpt.py", "pretrain_vit.py")
RECIPES = {"gpt-demo": "pretrain_gpt.py", "vit-demo": "pretrain_vit.py"}  # the scripts' no-flag demos
STUDY_OWNED = ("--save", "--load", "--tensorboard-dir", "--seed", "--moe-router-type", "--run-name")
LEARNED_AUX_LOSS_COEFF = "1e-2"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ITERATION_LINE = re.compile(r"^iteration\s+(\d+)/(\d+)")


class StudyError(ValueError):
    """Bad study input; str() is the one-line message (without `error: `)."""


# ---------------------------------------------------------------------------------------------
# the study and its runs

@dataclass
class Run:
    router: str
    seed: int
    dir: str

    @property
    def name(self) -> str:
        return f"{self.router}-s{self.seed}"

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.dir, "checkpoints")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.dir, "tensorboard")

    @property
    def marker(self) -> str:
        return os.path.join(self.dir, "done.json")


@dataclass
class Study:
    script: str                 # path of pretrain_gpt.py or pretrain_vit.py
    base_flags: list
    routers: list
    seeds: list
    output: str
    train_iters: int            # effective, after the base's defaults (the demo's 300, ...)
    budget_flags: list = field(default_factory=list)  # ["--train-iters", N] when the study sets the budget
    num_experts: int = 0
    topk: int = 0
    expert_width: int = 0
    nproc_per_node: int = 1
    save_interval: int | None = None

    def runs(self) -> list[Run]:
        """Seed by seed (every router once before any gets a second seed: a study cut short still compares all)."""
        return [Run(r, s, os.path.join(self.output, "runs", f"{r}-s{s}")) for s in self.seeds for r in self.routers]

    def router_flags(self, router: str) -> list[str]:
        """The flags that make the base launch this router's run (appended after the base flags)."""
        given = {f.split("=")[0] for f in self.base_flags if f.startswith("--")}
        if router == "dense":  # matched active FLOPs: one FFN as wide as the k active experts together
            return ["--num-experts", "0", "--ffn-hidden-size", str(self.topk * self.expert_width)]
        flags = ["--moe-router-type", router]
        if router == "learned" and "--moe-aux-loss-coeff" not in given:
            flags += ["--moe-aux-loss-coeff", LEARNED_AUX_LOSS_COEFF]
        if router == "routing-free" and "--routing-free-density-target" not in given:
            flags += ["--routing-free-density-target", repr(self.topk / self.num_experts)]
        if router == "routing-free" and "--routing-free-preset" not in given:
            from selfmoe.training.arguments import ROUTING_FREE_DEMO_DEFAULTS

            # the demo's lambda controller: the paper's (lambda0 1e-10, eta 0.02) would leave a
            # study-length run dense, not at the matched density
            for name, value in ROUTING_FREE_DEMO_DEFAULTS.items():
                flag = "--" + name.replace("_", "-")
                if flag not in given:
                    flags += [flag, str(value)]
        return flags

    def run_flags(self, run: Run) -> list[str]:
        flags = list(self.base_flags) + self.router_flags(run.router) + list(self.budget_flags)
        flags += ["--seed", str(run.seed), "--save", run.checkpoints, "--load", run.checkpoints,
                  "--tensorboard-dir", run.tensorboard]
        if self.save_interval and "--save-interval" not in {f.split("=")[0] for f in self.base_flags}:
            flags += ["--save-interval", str(self.save_interval)]
        return flags

    def local_command(self, run: Run) -> list[str]:
        if self.nproc_per_node > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(self.nproc_per_node)]
        else:
            launcher = [sys.executable]
        return launcher + [self.script] + self.run_flags(run)

    def launch_line(self, run: Run, launcher: str | None = None) -> str:
        launcher = launcher or f"torchrun --nproc-per-node {self.nproc_per_node}"
        return f"{launcher} {shlex.quote(self.script)} {shlex.join(self.run_flags(run))}"

    def identity(self) -> dict:
        """What a later call on the same folder must repeat (routers and seeds may be added)."""
        return {"script": os.path.basename(self.script), "base_flags": list(self.base_flags),
                "train_iters": self.train_iters}


def parse_base(script: str, flags: list, nproc_per_node: int = 1):
    """The base launch's effective arguments, parsed by the script's own parser (its defaults,
    demo defaults and checks; a bad flag prints the script's one `error:` line and exits 2)."""
    from selfmoe.training.arguments import DEMO_DEFAULTS, parse_args

    if os.path.basename(script) == "pretrain_vit.py":
        from selfmoe.training.vit import (VIT_DEMO_DEFAULTS, add_vision_args, prepare_vision_args,
                                          validate_vision_data)

        return parse_args(flags, world_size=nproc_per_node, demo_defaults=VIT_DEMO_DEFAULTS,
                          extra_args_provider=add_vision_args, prepare_args=prepare_vision_args,
                          validate_data=validate_vision_data)
    return parse_args(flags, world_size=nproc_per_node, demo_defaults=DEMO_DEFAULTS)


def parse_list(text: str, flag: str, cast=str) -> list:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise StudyError(f"{flag} is empty")
    try:
        items = [cast(x) for x in items]
    except ValueError:
        raise StudyError(f"{flag}: expected comma-separated integers, got {text!r}")
    if len(set(items)) != len(items):
        raise StudyError(f"{flag}: {text!r} names an entry twice")
    return items


def make_study(script: str, base_flags: list, routers: list, seeds: list, output: str, train_iters=None,
               train_tokens=None, train_images=None, nproc_per_node: int = 1, save_interval=None) -> Study:
    """Check the input (StudyError, before anything runs) and resolve the base launch's facts."""
    if os.path.basename(script) not in SCRIPTS:
        raise StudyError(f"--script must be one of {', '.join(SCRIPTS)} (got {script})")
    if not os.path.isfile(script):
        raise StudyError(f"--script: no such file {script}")
    for r in routers:
        if r not in ROUTERS:
            raise StudyError(f"--routers: unknown router {r!r} (choose from {', '.join(ROUTERS)})")
    for f in base_flags:
        if f.split("=")[0] in STUDY_OWNED:
            raise StudyError(f"base flags: {f.split('=')[0]} is set per run by the study "
                             f"(routers with --routers, seeds with --seeds, folders under --output)")
    budgets = [(n, v) for n, v in (("--train-iters", train_iters), ("--train-tokens", train_tokens),
                                   ("--train-images", train_images)) if v is not None]
    if len(budgets) > 1:
        raise StudyError(f"give one budget, not {' and '.join(n for n, _ in budgets)}")
    for name, value in budgets:
        if value <= 0:
            raise StudyError(f"{name} must be > 0 (got {value})")
    if budgets and any(f.split("=")[0] in ("--train-iters", "--train-samples") for f in base_flags):
        raise StudyError(f"{budgets[0][0]} and a --train-iters/--train-samples in the base flags: give the budget once")
    if save_interval is not None and save_interval <= 0:
        raise StudyError(f"--save-interval must be > 0 (got {save_interval})")
    if os.path.exists(output) and not os.path.isdir(output):
        raise StudyError(f"--output {output} exists and is not a folder")

    # the budget's iterations stand in while parsing (a tokens/images budget needs the batch first)
    args = parse_base(script, list(base_flags) + (["--train-iters", str(train_iters or 1)] if budgets else []),
                      nproc_per_node)
    vision = os.path.basename(script) == "pretrain_vit.py"
    if train_tokens is not None and vision:
        raise StudyError("--train-tokens is for pretrain_gpt.py; a ViT study counts --train-images")
    if train_images is not None and not vision:
        raise StudyError("--train-images is for pretrain_vit.py; a GPT study counts --train-tokens")
    per_iter = args.global_batch_size * (1 if vision else args.seq_length)
    iters = args.train_iters
    if iters is None and getattr(args, "train_samples", None):
        iters = math.ceil(args.train_samples / args.global_batch_size)
    if train_iters is not None:
        iters = train_iters
    elif train_tokens is not None or train_images is not None:
        iters = math.ceil((train_tokens or train_images) / per_iter)
    if any(r != "dense" for r in routers) and not args.num_experts:
        raise StudyError("the base launch has no experts (--num-experts); the MoE routers need them")
    study = Study(script=script, base_flags=list(base_flags), routers=list(routers), seeds=list(seeds),
                  output=output, train_iters=int(iters), num_experts=args.num_experts or 0,
                  topk=args.moe_router_topk, nproc_per_node=nproc_per_node,
                  expert_width=args.moe_ffn_hidden_size or args.ffn_hidden_size,
                  budget_flags=["--train-iters", str(int(iters))] if budgets else [],
                  save_interval=save_interval or max(1, int(iters) // 2))
    if study.num_experts and "routing-free" in routers and study.topk > study.num_experts:
        raise StudyError(f"--moe-router-topk {study.topk} > --num-experts {study.num_experts}")
    check_identity(study)
    return study


def check_identity(study: Study):
    """A study folder is new, empty, or this study's own (its study.json matches): the runs and the
    report are written into it, and nothing else of the user's may be mixed with them."""
    path = os.path.join(study.output, "study.json")
    if not os.path.isfile(path) and os.path.isdir(study.output) and os.listdir(study.output):
        raise StudyError(f"--output {study.output} is a folder that holds no study (no study.json) and is not "
                         f"empty; use a new or empty folder")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for key, value in study.identity().items():
            if old.get(key) != value:
                raise StudyError(f"--output {study.output} holds a study with another {key} "
                                 f"({old.get(key)!r}, now {value!r}); use another --output")


def save_identity(study: Study):
    """STUDY/study.json, once: later calls on the folder are checked against it (check_identity)."""
    path = os.path.join(study.output, "study.json")
    if not os.path.isfile(path):
        write_atomically(path, json.dumps(study.identity(), indent=1) + "\n")


def checkpoint_iteration(folder: str) -> int | None:
    """The iteration of the latest checkpoint in `folder` (Megatron's tracker file or DeepSpeed's `latest`)."""
    for name in ("latest_checkpointed_iteration.txt", "latest"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digits = re.findall(r"\d+", open(path).read())
            return int(digits[-1]) if digits else None
    return None


# ---------------------------------------------------------------------------------------------
# running

def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """One line per child log interval: runs done/total, the study's iterations, elapsed and ETA
    (from the iterations trained by this call per second of wall time, run start-ups included)."""

    def __init__(self, total_runs: int, done_runs: int, total_iters: int, done_iters: int, out=None):
        self.total_runs, self.done_runs = total_runs, done_runs
        self.total_iters, self.done_iters = total_iters, done_iters
        self.start_done = done_iters
        self.start = time.time()
        self.out = out or sys.stdout

    def line(self, text: str):
        elapsed = time.time() - self.start
        trained = self.done_iters - self.start_done
        eta = elapsed / trained * (self.total_iters - self.done_iters) if trained > 0 else None
        pct = 100.0 * self.done_iters / max(1, self.total_iters)
        print(f"study: {self.done_runs}/{self.total_runs} runs done | {pct:.0f}% of iterations | {text} | "
              f"elapsed {duration(elapsed)} | ETA {duration(eta) if eta is not None else '-'}",
              file=self.out, flush=True)


def run_study(study: Study, out=None) -> dict:
    """Run every unfinished (router, seed) one after another; returns {"launched": [...], "failed": [...]}."""
    out = out or sys.stdout
    save_identity(study)
    runs = study.runs()
    done = {run.name for run in runs if is_finished(study, run)}
    todo = [run for run in runs if run.name not in done]
    partial = sum(min(checkpoint_iteration(r.checkpoints) or 0, study.train_iters) for r in todo)
    progress = Progress(len(runs), len(done), len(runs) * study.train_iters,
                        len(done) * study.train_iters + partial, out)
    if done:
        print(f"study: {len(done)} of {len(runs)} runs already finished ({', '.join(sorted(done))})", file=out)
    launched, failed = [], []
    for run in todo:
        start_iter = min(checkpoint_iteration(run.checkpoints) or 0, study.train_iters)
        progress.line(f"{run.name}: start" + (f" from iteration {start_iter}" if start_iter else ""))
        launched.append(run.name)
        rc, seconds, credited = launch(study, run, progress, start_iter)
        reached = checkpoint_iteration(run.checkpoints) or 0
        progress.done_iters += max(0, min(reached, study.train_iters) - start_iter) - credited
        if rc == 0 and reached >= study.train_iters:
            write_atomically(run.marker, json.dumps({"router": run.router, "seed": run.seed,
                                                     "iterations": reached, "seconds": round(seconds, 1)}) + "\n")
            progress.done_runs += 1
            progress.line(f"{run.name}: finished in {duration(seconds)}")
        else:
            failed.append(run.name)
            tail = "".join(open(os.path.join(run.dir, "train.log")).readlines()[-5:]).rstrip()
            print(f"study: run {run.name} stopped at iteration {reached} of {study.train_iters} "
                  f"(exit code {rc}); log {os.path.join(run.dir, 'train.log')}:\n{tail}", file=out, flush=True)
    return {"launched": launched, "failed": failed}


def launch(study: Study, run: Run, progress: Progress, start_iter: int) -> tuple[int, float, int]:
    """Start the run's training process, tee its output to train.log, report progress.

    Returns (exit code, seconds, iterations credited to the progress from its console lines)."""
    os.makedirs(run.dir, exist_ok=True)
    cmd = study.local_command(run)
    write_atomically(os.path.join(run.dir, "command.txt"), shlex.join(cmd) + "\n")
    t0 = time.time()
    credit = 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(os.path.join(run.dir, "train.log"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()  # a killed study keeps the run's log
                m = _ITERATION_LINE.match(line)
                if m:
                    it = int(m.group(1))
                    progress.done_iters += max(0, it - start_iter) - credit
                    credit = max(0, it - start_iter)
                    progress.line(f"{run.name}: iteration {it}/{m.group(2)}")
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # the study was interrupted: stop the run (it resumes next time)
                proc.terminate()
                proc.wait()
    return rc, time.time() - t0, credit


def is_finished(study: Study, run: Run) -> bool:
    """done.json, or (made by a launch line elsewhere) a checkpoint at the last iteration whose
    TensorBoard logs hold the final validation; the marker is then written."""
    if os.path.isfile(run.marker):
        return True
    if (checkpoint_iteration(run.checkpoints) or 0) < study.train_iters or not os.path.isdir(run.tensorboard):
        return False
    log = read_run(run.tensorboard)
    if log.final_step(log.validation_tag) != study.train_iters:
        return False
    write_atomically(run.marker, json.dumps({"router": run.router, "seed": run.seed,
                                             "iterations": study.train_iters}) + "\n")
    return True


# ---------------------------------------------------------------------------------------------
# reading the logs

@dataclass
class RunLog:
    """One run's TensorBoard scalars ({tag: {step: value}}) and text arguments ({name: text})."""
    path: str
    scalars: dict
    args: dict

    @property
    def router(self) -> str:
        if self.args.get("num_experts") in (None, "None", "0"):
            return "dense"
        return self.args.get("moe_router_type", "?")

    @property
    def seed(self) -> int | None:
        s = self.args.get("seed")
        return int(s) if s not in (None, "None") else None

    @property
    def unit(self) -> str:
        return "images" if "throughput/images-per-sec" in self.scalars else "tokens"

    @property
    def loss_name(self) -> str:
        return "lm loss" if self.unit == "tokens" else "loss"

    @property
    def validation_tag(self) -> str:
        return f"{self.loss_name} validation"

    def final_step(self, tag: str) -> int | None:
        series = self.scalars.get(tag)
        return max(series) if series else None

    def final(self, tag: str) -> float | None:
        series = self.scalars.get(tag)
        return series[max(series)] if series else None

    def load_fractions(self) -> tuple[list, list] | None:
        """([MoE layer][expert] load fractions at the last logged step, the layer numbers)."""
        pat = re.compile(r"^routing/load_fraction/layer_(\d+)/expert_(\d+)$")
        cells = {}
        for tag in self.scalars:
            m = pat.match(tag)
            if m:
                cells[int(m.group(1)), int(m.group(2))] = self.final(tag)
        if not cells:
            return None
        layers = sorted({l for l, _ in cells})
        experts = max(e for _, e in cells) + 1
        return [[cells.get((l, e), 0.0) for e in range(experts)] for l in layers], layers


def read_run(tensorboard_dir: str) -> RunLog:
    """Read one run's event files. A resumed run logs the steps after its checkpoint again (a new
    event file); for each step the value written last wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags["scalars"]:
        events = sorted(acc.Scalars(tag), key=lambda e: e.wall_time)
        scalars[tag] = dict(sorted({e.step: e.value for e in events}.items()))
    args = {}
    for tag in tags["tensors"]:
        if tag.endswith("/text_summary"):
            events = sorted(acc.Tensors(tag), key=lambda e: e.wall_time)
            values = events[-1].tensor_proto.string_val
            if values:
                args[tag[:-len("/text_summary")]] = values[0].decode()
    return RunLog(tensorboard_dir, scalars, args)


def find_tensorboard_dirs(paths: list) -> list[str]:
    """Every folder under `paths` that holds TensorBoard event files (a study, a runs folder, a run)."""
    found = []
    for root in paths:
        if not os.path.isdir(root):
            raise StudyError(f"--from-tensorboard: no such folder {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "checkpoints" in dirnames:
                dirnames.remove("checkpoints")
            if any(f.startswith("events.out.tfevents.") for f in filenames):
                found.append(dirpath)
        if not any(d == root or d.startswith(root.rstrip(os.sep) + os.sep) for d in found):
            raise StudyError(f"--from-tensorboard: no TensorBoard event files under {root}")
    return found


# ---------------------------------------------------------------------------------------------
# the report

ROUTING_KEYS = ("normalized_entropy", "max_overload", "dead_experts", "experts_per_token")


def run_metrics(log: RunLog) -> dict:
    """One run's report numbers, each read from one TensorBoard tag (last logged step unless said)."""
    m = {"router": log.router, "seed": log.seed, "iteration": log.final_step(log.validation_tag),
         "val_loss": log.final(log.validation_tag)}
    if log.unit == "tokens":
        m["val_ppl"] = log.final(f"{log.validation_tag} ppl")
    else:
        m["top1"] = log.final("top-1 validation")
    for key in ROUTING_KEYS:
        m[key] = log.final(f"routing/{key}")
    m["router_params"] = log.final("parameters/router")
    m["active_params"] = log.final("parameters/active")
    rates = list(log.scalars.get(f"throughput/{log.unit}-per-sec", {}).values())
    m["throughput"] = statistics.median(rates) if rates else None  # per log interval; median: robust to a busy machine
    return m


def metric_columns(unit: str) -> list[str]:
    quality = ["val_loss", "val_ppl"] if unit == "tokens" else ["val_loss", "top1"]
    return quality + list(ROUTING_KEYS) + ["router_params", "active_params", "throughput"]


def mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def summarize(per_run: list[dict], unit: str, order: list | None = None) -> list[dict]:
    """Per router: mean and sample standard deviation over its seeds of every metric; throughput
    ratio of the means to the learned router's."""
    routers = [r for r in (order or ROUTERS) if any(m["router"] == r for m in per_run)]
    routers += sorted({m["router"] for m in per_run} - set(routers))
    rows = []
    for r in routers:
        runs = sorted((m for m in per_run if m["router"] == r), key=lambda m: (m["seed"] is None, m["seed"]))
        row = {"router": r, "seeds": " ".join(str(m["seed"]) for m in runs), "runs": len(runs)}
        for col in metric_columns(unit):
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std([m.get(col) for m in runs])
        rows.append(row)
    learned = next((row for row in rows if row["router"] == "learned"), None)
    for row in rows:
        base = learned and learned["throughput_mean"]
        row["throughput_vs_learned"] = row["throughput_mean"] / base if base and row["throughput_mean"] else None
    return rows


def csv_columns(unit: str) -> list[str]:
    cols = ["router", "seeds", "runs"]
    for c in metric_columns(unit):
        cols += [f"{c}_mean", f"{c}_std"]
    return cols + ["throughput_vs_learned"]


def _csv(rows: list[dict], cols: list[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                    for c in cols])
    return buf.getvalue()


def _fmt(mean, std, digits: int, scale: float = 1.0) -> str:
    if mean is None:
        return "—"
    text = f"{mean * scale:,.{digits}f}"
    return text + (f" ± {std * scale:,.{digits}f}" if std is not None else "")


def _count(n) -> str:
    if n is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def claims(rows: list[dict], unit: str) -> list[tuple]:
    """(claim, measured, paper, verdict) for the two papers' comparisons present in `rows`.

    Verdict: "yes" when the sign matches and the gap exceeds the sum of the two seed standard
    deviations; "within noise" when the sign matches but not by that much; "no" otherwise."""
    by = {row["router"]: row for row in rows}
    out = []
    if unit == "tokens":
        q, name = "val_ppl", "validation PPL"
    else:
        q, name = "top1", "top-1"

    def gap(a, b, key, paper, want_sign, label):
        if a not in by or b not in by or by[a][f"{key}_mean"] is None or by[b][f"{key}_mean"] is None:
            return
        x, y = by[a][f"{key}_mean"], by[b][f"{key}_mean"]
        stds = (by[a][f"{key}_std"], by[b][f"{key}_std"])
        rel = 100.0 * (x / y - 1.0)
        if math.copysign(1, x - y) != want_sign or x == y:
            verdict = "no" if None in stds or abs(x - y) > sum(stds) else "no (opposite sign, within noise)"
        elif None in stds:
            verdict = "same direction (one seed: no noise estimate)"
        else:
            verdict = "yes" if abs(x - y) > sum(stds) else "within noise"
        diff = f"{x - y:+.2f} points" if key == "top1" else f"{rel:+.1f}%"  # accuracies differ in points
        out.append((label, f"{diff} ({_fmt(x, by[a][f'{key}_std'], 3)} vs {_fmt(y, by[b][f'{key}_std'], 3)})",
                    paper, verdict))

    if unit == "tokens":
        gap("self", "learned", q, "+2.6% (27.4 vs 26.7)", +1, f"Self-Routing vs learned: {name}")
        gap("self", "learned", "normalized_entropy", "about +17%", +1, "Self-Routing vs learned: normalized routing entropy")
        gap("random", "learned", q, "worse (higher)", +1, f"random vs learned: {name}")
        gap("hash", "learned", q, "worse (higher)", +1, f"hash vs learned: {name}")
        label = f"Routing-Free vs learned top-k, matched density: {name}"
        if "routing-free" in by and "learned" in by:  # matched only if the density target was reached
            k_rf, k = by["routing-free"]["experts_per_token_mean"], by["learned"]["experts_per_token_mean"]
            if k_rf is not None and k and abs(k_rf / k - 1) > 0.1:
                label = f"Routing-Free vs learned top-k: {name} (NOT matched: {k_rf:.2f} vs {k:.2f} experts/token)"
        gap("routing-free", "learned", q, "-12.2% (27.42 vs 31.22, top-3 of 12)", -1, label)
    else:
        gap("self", "learned", q, "higher (slightly)", +1, f"Self-Routing vs learned: {name}")
        gap("self", "dense", q, "+0.30 points (79.92 vs 79.62)", +1, f"Self-Routing vs dense: {name}")
        gap("self", "learned", "normalized_entropy", "about +17% (language)", +1,
            "Self-Routing vs learned: normalized routing entropy")
    return out


def write_report(logs: list[RunLog], folder: str, title: str, notes: list | None = None,
                 order: list | None = None) -> dict:
    """report.md, report.csv (per router), runs.csv (per run) and the PNGs into `folder`."""
    if not logs:
        raise StudyError("no finished runs to report")
    unit = logs[0].unit
    if any(log.unit != unit for log in logs):
        raise StudyError("the runs mix language (tokens) and vision (images) models; report them apart")
    os.makedirs(folder, exist_ok=True)
    per_run = [run_metrics(log) | {"path": log.path} for log in logs]
    rows = summarize(per_run, unit, order)
    write_atomically(os.path.join(folder, "report.csv"), _csv(rows, csv_columns(unit)))
    run_cols = ["router", "seed", "iteration"] + metric_columns(unit) + ["path"]
    write_atomically(os.path.join(folder, "runs.csv"),
                     _csv(sorted(per_run, key=lambda m: (m["router"], m["seed"] or 0)), run_cols))
    plots = write_plots(logs, rows, folder, unit)

    q = ("val PPL", "val_ppl", 2, 1.0) if unit == "tokens" else ("val top-1 %", "top1", 2, 1.0)
    rate = "tokens/s" if unit == "tokens" else "images/s"
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += ["", f"| router | seeds | val loss | {q[0]} | norm. routing entropy | max overload | dead experts | "
              f"experts/token | router params | active params | {rate} | × learned |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = row["throughput_vs_learned"]
        lines.append(" | ".join([
            f"| {row['router']}", row["seeds"], _fmt(row["val_loss_mean"], row["val_loss_std"], 4),
            _fmt(row[f"{q[1]}_mean"], row[f"{q[1]}_std"], q[2]),
            _fmt(row["normalized_entropy_mean"], row["normalized_entropy_std"], 3),
            _fmt(row["max_overload_mean"], row["max_overload_std"], 2),
            _fmt(row["dead_experts_mean"], row["dead_experts_std"], 2),
            _fmt(row["experts_per_token_mean"], row["experts_per_token_std"], 2),
            _count(row["router_params_mean"]), _count(row["active_params_mean"]),
            _fmt(row["throughput_mean"], row["throughput_std"], 0), f"{ratio:.2f}" if ratio else "—"]) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds; each number is the run's last logged value "
              "(validation at the last iteration; routing metrics over the last log interval, averaged over "
              "MoE layers; throughput: median over log intervals). Dense has no routing metrics.", ""]
    found = claims(rows, unit)
    if found:
        lines += ["## The papers' claims at this scale", "", "| comparison | measured | paper | reproduced |",
                  "|---|---|---|---|"]
        lines += [f"| {c} | {m} | {p} | {v} |" for c, m, p, v in found]
        lines += ["", "reproduced: `yes` = same direction and the gap exceeds the two seed standard deviations "
                  "together; `within noise` = same direction, smaller gap; `no` = opposite direction.", ""]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", ""]
    lines += ["## Runs", "", "| run | router | seed | iteration | val loss | " + q[0] + " | entropy | " + rate + " |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(per_run, key=lambda m: (m["router"], m["seed"] or 0)):
        lines.append(f"| {m['path']} | {m['router']} | {m['seed']} | {m['iteration']} | "
                     f"{_fmt(m['val_loss'], None, 4)} | {_fmt(m.get(q[1]), None, 2)} | "
                     f"{_fmt(m['normalized_entropy'], None, 3)} | {_fmt(m['throughput'], None, 0)} |")
    write_atomically(os.path.join(folder, "report.md"), "\n".join(lines) + "\n")
    return {"rows": rows, "runs": per_run, "plots": [p for p, _ in plots], "claims": found}


def write_plots(logs: list[RunLog], rows: list[dict], folder: str, unit: str) -> list[tuple]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = [row["router"] for row in rows]
    by_router = {r: sorted((l for l in logs if l.router == r), key=lambda l: l.seed or 0) for r in routers}
    written = []

    def curves(tag, ylabel, name, caption, only_moe=False, logy=False):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
        drawn = False
        for r in routers:
            if only_moe and r == "dense":
                continue
            series = [l.scalars[tag] for l in by_router[r] if tag in l.scalars]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            mean = [statistics.fmean(s[t] for s in series) for t in steps]
            lo = [min(s[t] for s in series) for t in steps]
            hi = [max(s[t] for s in series) for t in steps]
            (line,) = ax.plot(steps, mean, marker="o" if len(steps) < 12 else None, ms=3, label=r)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
            drawn = True
        if not drawn:
            plt.close(fig)
            return
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(caption, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name))
        plt.close(fig)
        written.append((name, caption))

    loss = "lm loss" if unit == "tokens" else "loss"
    curves(f"{loss} validation", f"validation {loss}", "validation.png",
           "validation loss (mean over seeds, band: min-max)")
    curves("routing/normalized_entropy", "H(f) / log E", "entropy.png",
           "normalized routing entropy over training (mean over seeds)", only_moe=True)

    maps = []
    for r in routers:
        if by_router[r]:
            lf = by_router[r][0].load_fractions()
            if lf:
                maps.append((r, by_router[r][0].seed, *lf))
    if maps:
        vmax = max(max(max(row) for row in m[2]) for m in maps)
        fig, axes = plt.subplots(1, len(maps), figsize=(max(4.5, 2.2 * len(maps) + 1.2), 3.0), dpi=90,
                                 squeeze=False, layout="constrained")
        for ax, (r, seed, grid, layers) in zip(axes[0], maps):
            im = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
            ax.set_title(f"{r} (seed {seed})", fontsize=9)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([str(l) for l in layers], fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
        axes[0][0].set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=list(axes[0]), shrink=0.9, label=f"load fraction (uniform {1 / len(maps[0][2][0]):.3g})")
        fig.suptitle("expert load per MoE layer, last log interval", fontsize=9)
        fig.savefig(os.path.join(folder, "expert_load.png"))
        plt.close(fig)
        written.append(("expert_load.png", "expert load per layer at the end of training"))
    return written


def study_report(study: Study) -> dict:
    """The report of a study's finished runs, into STUDY/report/."""
    runs = [r for r in study.runs() if os.path.isfile(r.marker)]
    logs = [read_run(r.tensorboard) for r in runs]
    unfinished = [r.name for r in study.runs() if not os.path.isfile(r.marker)]
    notes = [f"script `{os.path.basename(study.script)}`, base flags `{shlex.join(study.base_flags) or '(the demo)'}`",
             f"{study.train_iters} iterations per run; seeds {', '.join(map(str, study.seeds))}",
             "per-router flags: " + "; ".join(f"{r} `{shlex.join(study.router_flags(r))}`" for r in study.routers),
             "matched active parameters per token: MoE routers share E, k and the expert width; Routing-Free "
             "targets density k/E; dense has one FFN of width k × expert width (matched active FLOPs)"]
    if unfinished:
        notes.append(f"not finished, left out: {', '.join(unfinished)}")
    return write_report(logs, os.path.join(study.output, "report"), "Router study", notes, study.routers)


def report_from_tensorboard(paths: list, folder: str) -> dict:
    logs, left = [], []
    for d in find_tensorboard_dirs(paths):
        log = read_run(d)
        target = log.args.get("train_iters", "None")
        reached = log.final_step(log.validation_tag)
        if reached is None or (target.isdigit() and reached < int(target)):
            left.append(f"{d} (validation at iteration {reached} of {target})")
        else:
            logs.append(log)
    if not logs:
        raise StudyError("--from-tensorboard: no finished run (validation at its last iteration) under "
                         + " ".join(paths))
    notes = [f"runs: {', '.join(l.path for l in logs)}"]
    if left:
        notes.append(f"not finished, left out: {'; '.join(left)}")
    return write_report(logs, folder, "Router study (from TensorBoard logs)", notes)
