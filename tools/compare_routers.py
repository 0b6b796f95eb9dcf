"""Compare MoE routers: train one base launch once per (router, seed) and report the comparison.

    # the GPT demo (Shakespeare), every router, 3 seeds, 300 iterations each, run here one after another
    python tools/compare_routers.py gpt-demo --routers dense,learned,self,random,hash,routing-free \\
        --seeds 1,2,3 --output studies/gpt-demo
    # any pretrain_gpt.py / pretrain_vit.py flag set after `--`, a budget in iterations/tokens/images
    python tools/compare_routers.py --script pretrain_gpt.py --routers learned,self --seeds 1,2 \\
        --train-tokens 5000000 --output studies/owt -- --data-path data/owt_text_document ...
    # a cluster: one torchrun line per unfinished run; re-run without --emit-launch for the report
    python tools/compare_routers.py gpt-demo --routers learned,self --seeds 1,2,3 --output S --emit-launch
    # the same report from runs that already exist
    python tools/compare_routers.py --from-tensorboard runs/a runs/b --output report/

Writes STUDY/runs/<router>-s<seed>/ (checkpoints, tensorboard, train.log) and STUDY/report/
(report.md, report.csv, runs.csv, PNGs). Finished runs are not started again; killed ones resume
from their checkpoint. See selfmoe/studies.py for what is matched between runs.
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron-core, on every config
warnings.filterwarnings("ignore", category=FutureWarning)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def build_parser():
    from selfmoe.studies import RECIPES, ROUTERS

    p = _Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("recipe", nargs="?", help=f"a base launch by name: {', '.join(RECIPES)} (the scripts' demos)")
    p.add_argument("--script", help="pretrain_gpt.py or pretrain_vit.py (base flags after `--`)")
    p.add_argument("--routers", default=",".join(ROUTERS), help=f"comma-separated, from {','.join(ROUTERS)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated integers (Megatron's --seed per run)")
    p.add_argument("--train-iters", type=int, help="budget per run in iterations (default: the base's)")
    p.add_argument("--train-tokens", type=int, help="budget per run in tokens (GPT)")
    p.add_argument("--train-images", type=int, help="budget per run in images (ViT)")
    p.add_argument("--save-interval", type=int, help="checkpoint every N iterations (default: half the run)")
    p.add_argument("--output", required=True, help="the study folder (or, with --from-tensorboard, the report folder)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--emit-launch", action="store_true", help="print one launch line per unfinished run, run nothing")
    p.add_argument("--launcher", help='the launch lines\' launcher (default "torchrun --nproc-per-node N")')
    p.add_argument("--no-report", action="store_true", help="run only; no report")
    p.add_argument("--from-tensorboard", nargs="+", metavar="DIR", help="build the report from these runs' logs")
    return p


def _stop(signum, frame):  # SIGTERM as Ctrl-C: the running training process is stopped too (it resumes later)
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    base = []
    if "--" in argv:
        at = argv.index("--")
        argv, base = argv[:at], argv[at + 1:]
    args = build_parser().parse_args(argv)
    from selfmoe.studies import RECIPES, StudyError, make_study, parse_list, report_from_tensorboard, run_study, study_report

    try:
        if args.from_tensorboard:
            if args.recipe or args.script or base:
                raise StudyError("--from-tensorboard builds a report only; it takes no recipe, script or base flags")
            result = report_from_tensorboard(args.from_tensorboard, args.output)
            print(f"report: {os.path.join(args.output, 'report.md')} ({len(result['runs'])} runs)")
            return 0
        if args.recipe and args.script:
            raise StudyError("give a recipe or --script, not both")
        if args.recipe:
            if args.recipe not in RECIPES:
                raise StudyError(f"unknown recipe {args.recipe!r} (choose from {', '.join(RECIPES)}, or --script)")
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            script = os.path.join(repo, RECIPES[args.recipe])
            if not os.path.relpath(script).startswith(".."):
                script = os.path.relpath(script)  # launch lines read like the README's
        elif args.script:
            script = args.script
        else:
            raise StudyError("give a recipe (gpt-demo, vit-demo) or --script pretrain_gpt.py|pretrain_vit.py")
        if args.nproc_per_node < 1:
            raise StudyError(f"--nproc-per-node must be >= 1 (got {args.nproc_per_node})")
        routers = parse_list(args.routers, "--routers")
        seeds = parse_list(args.seeds, "--seeds", int)
        study = make_study(script, base, routers, seeds, args.output, train_iters=args.train_iters,
                           train_tokens=args.train_tokens, train_images=args.train_images,
                           nproc_per_node=args.nproc_per_node, save_interval=args.save_interval)
        if args.emit_launch:
            from selfmoe.studies import is_finished, save_identity

            save_identity(study)  # the cluster's runs belong to this study: later calls must match it
            for run in study.runs():
                if not is_finished(study, run):
                    print(study.launch_line(run, args.launcher))
            return 0
        result = run_study(study)
        if args.no_report:
            return 1 if result["failed"] else 0
        if any(os.path.isfile(r.marker) for r in study.runs()):
            report = study_report(study)
            print(f"report: {os.path.join(study.output, 'report', 'report.md')}")
            for row in report["rows"]:
                q = "val_ppl" if "val_ppl_mean" in row else "top1"
                print(f"  {row['router']:<13} {q} {row[f'{q}_mean']:.3f}  entropy "
                      + (f"{row['normalized_entropy_mean']:.3f}" if row["normalized_entropy_mean"] is not None else "-"))
        if result["failed"]:
            print(f"error: {len(result['failed'])} run(s) did not finish: {', '.join(result['failed'])}",
                  file=sys.stderr)
            return 1
        return 0
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background (SIGINT ignored there)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("study: interrupted; the same command resumes it", file=sys.stderr)
        sys.exit(130)
