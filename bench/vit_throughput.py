"""Vision throughput: the input pipeline alone (decode + DeiT augmentation in DataLoader workers)
against the training step's demand, and pretrain_vit.py's training images/s per router relative
to the learned router. Not a test.

    # a 2-core CPU box: Fashion-MNIST demo size (what the README reports)
    .venv/bin/python bench/vit_throughput.py
    # ImageNet JPEGs with the DeiT recipe's augmentation, 224x224
    .venv/bin/python bench/vit_throughput.py --data-path /data/imagenet --img 224 --workers 1,2,8

Input pipeline: images/s of ImageClassificationDataset.micro_batches with N workers (the
trainer's own iterator), over --pipeline-batches micro-batches after the first (worker start-up).
Training: images/s of the last log interval of a short pretrain_vit.py run per router (in this
process; --num-workers 1), and its ratio to learned. Demand/supply > 1 means the step is the
bottleneck, < 1 that the input pipeline would starve it.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def pipeline_images_per_s(args, workers: int, batches: int, mbs: int) -> float:
    from selfmoe.data.images import ImageClassificationDataset, build_transforms, fashion_mnist, open_sources

    train = (open_sources(args.data_path)[0] if args.data_path else fashion_mnist()[0])
    ds = ImageClassificationDataset(train, build_transforms(args, True), seed=1, shuffle=True, num_workers=workers,
                                    repeats=args.repeated_aug)
    it = ds.micro_batches(mbs, 0, 1, 0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * mbs / (time.perf_counter() - t0)


def main():
    from selfmoe.training.vit import VIT_DEMO_DEFAULTS, add_vision_args

    p = add_vision_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--data-path", nargs="*")
    p.add_argument("--img", type=int, help="image size (default: 28 for the demo data)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--pipeline-batches", type=int, default=30)
    p.add_argument("--routers", default="learned,self,random,hash,routing-free,dense")
    p.add_argument("--train-iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if not args.data_path:
        # the demo's data/model settings; not its schedule (the bench's own short --train-iters)
        p.set_defaults(**{k: v for k, v in VIT_DEMO_DEFAULTS.items() if k in vars(args) and k != "train_iters"})
        args = p.parse_args()
    if args.img:
        args.img_h = args.img_w = args.img
    mbs = VIT_DEMO_DEFAULTS["micro_batch_size"]
    print(f"input pipeline ({'--data-path ' + ' '.join(args.data_path) if args.data_path else 'Fashion-MNIST demo'}, "
          f"{args.img_h}x{args.img_w}, micro-batch {mbs}):")
    supply = {}
    for w in (int(x) for x in args.workers.split(",")):
        supply[w] = pipeline_images_per_s(args, w, args.pipeline_batches, mbs)
        print(f"  {w} worker{'s' if w > 1 else ''}: {supply[w]:,.0f} images/s", flush=True)

    import pretrain_vit

    base = [] if not args.data_path else ["--data-path", *args.data_path]
    results = {}
    for router in args.routers.split(","):
        flags = base + ["--train-iters", str(args.train_iters), "--log-interval", str(args.train_iters // 2),
                        "--eval-iters", "0", "--num-workers", "1", "--save", "", "--tensorboard-dir", ""]
        flags += ["--num-experts", "0"] if router == "dense" else ["--moe-router-type", router]
        out = pretrain_vit.main(flags)
        results[router] = out["images_per_s"]
    print("training (demo model, 1 DataLoader worker):")
    ref = results.get("learned")
    for router, ips in results.items():
        ratio = f" | {ips / ref:.2f}x learned" if ref else ""
        demand = " | ".join(f"demand/supply({w}w) {ips / s:.2f}" for w, s in supply.items())
        print(f"  {router:>12}: {ips:,.0f} images/s{ratio} | {demand}")


if __name__ == "__main__":
    main()
