"""Routing analysis of a trained checkpoint: where tokens go, layer by layer, and what each expert prefers.

`tools/analyze_routing.py` is the CLI; this module holds the measurements. A checkpoint of any
parallel layout is loaded as the one-rank fp32 model (selfmoe.conversion.common.load_model), a
fixed list of evaluation batches is run forward without gradients, and forward hooks on every
router record the routing decided, exactly as `selfmoe.metrics.RoutingStats` counts it: the map
before capacity dropping (`router.last_routing`), and the returned `probs` as combine weights.

Tokens are numbered as Megatron-Core's MoE layer sees them: hidden [s, b, H] flattened s-major, so
row t is position t // b of sequence t % b.

What is measured (P = MoE layers, E = experts, over all evaluated tokens):
- load [P, E]: routed token-expert pairs; the heatmap shows each layer's row as a fraction.
- experts per token [P, E+1]: histogram of how many experts a token was routed to (0..E; always k
  for top-k routers, anything for Routing-Free).
- top-1 expert of a token in a layer: argmax of its weights over the routed experts (ties: lowest
  index), or "none" (category E) for a token routed to no expert (Routing-Free).
  Agreement between MoE layers i and j, from the joint histogram of (top-1 in i, top-1 in j):
  * `same_top1[i, j]`: fraction of tokens whose top-1 category is the same index in both layers
    (meaningful where indices are tied across layers: Self-Routing reads the same channels of the
    residual stream in every layer, hash routing uses one table); `same_top1_chance[i, j]` =
    sum_e p_i(e) p_j(e), its value if the two layers chose independently with the same loads;
  * `nmi[i, j]`: normalized mutual information I(X;Y)/sqrt(H(X)H(Y)) of the two top-1
    categories (0 = independent, 1 = one determines the other; invariant to relabelling
    experts, so it compares layers of learned routers too; 1 if both are constant).
- top tokens per expert (the ST-MoE / Mixtral expert-specialisation tables, Zoph et al. 2022,
  Jiang et al. 2024): for key v (the token id for text, the patch position or the image class for
  images), score(e, v) = count(v routed to e) / count(v) -- the fraction of v's occurrences that
  expert e received, i.e. routing count normalised by frequency. Keys seen fewer than
  `min_count` times are left out (a singleton would score 1.0); ties broken by the count.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from selfmoe.conversion.common import ConversionError
from selfmoe.routers import moe_layers


@dataclass
class Batch:
    """One evaluation micro-batch. text: inputs = token ids [b, s], labels [b, s] (next tokens);
    images: inputs = images [b, C, H, W], labels = classes [b]. keys [b, s]: what the top-tokens
    table counts (token ids, or patch positions)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor


# ---------------------------------------------------------------------------------------------
# checkpoint and data (all checks raise ConversionError: one line, before the model is built)

def open_checkpoint(path: str, iteration: int | None = None) -> tuple[str, dict]:
    """(iter_ directory, common state) of a MoE checkpoint; reads no tensor."""
    from selfmoe.conversion.common import read_checkpoint_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path, iteration)
    common = read_checkpoint_config(ckpt)
    if not common["config"].get("num_moe_experts"):
        raise ConversionError(f"--load {ckpt}: a dense model (no --num-experts): it has no routing to analyze")
    return ckpt, common


def family(common: dict) -> str:
    """"images" for a pretrain_vit.py checkpoint (its run arguments hold the image size), else "text"."""
    return "images" if "img_h" in (common.get("args") or {}) else "text"


def load_analysis_model(path: str, iteration: int | None, common: dict):
    """(model, config) of the checkpoint as one rank, fp32, eval mode (GPT or ViT)."""
    from selfmoe.conversion.common import load_model

    build = None
    if family(common) == "images":
        from selfmoe.models import build_vit_model

        a = common["args"]

        def build(cfg, _common):
            return build_vit_model(cfg, a["img_h"], a["img_w"], a["patch_dim"], a["num_channels"], a["num_classes"],
                                   pool=a.get("vit_pool", "cls"))
    model, cfg, _ = load_model(path, iteration, build=build)
    return model, cfg


def run_tokenizer(run_args: dict, overrides: dict):
    """The run's tokenizer from its saved flags (or the given Megatron-LM tokenizer flags); None if
    the checkpoint names none."""
    from selfmoe.data.tokenizers import TokenizerError, build_tokenizer

    a = {**run_args, **{k: v for k, v in overrides.items() if v is not None}}
    if not a.get("tokenizer_type"):
        return None
    try:
        return build_tokenizer(a["tokenizer_type"], tokenizer_model=a.get("tokenizer_model"),
                               vocab_file=a.get("vocab_file"), merge_file=a.get("merge_file"),
                               vocab_size=a.get("vocab_size"))
    except TokenizerError as e:
        raise ConversionError(f"--tokenizer-type {a['tokenizer_type']}: {e}") from None


def text_source(data_path: str | None, run_args: dict) -> str:
    """The text to analyze: --data-path (indexed prefix, .txt, .jsonl), else the run's own corpus."""
    if data_path:
        if os.path.isfile(data_path + ".bin") and os.path.isfile(data_path + ".idx"):
            return data_path
        if os.path.isfile(data_path):
            return data_path
        raise ConversionError(f"--data-path {data_path}: neither <prefix>.bin/.idx nor a text/jsonl file")
    if run_args.get("use_demo_corpus"):
        from selfmoe.data.corpus import ensure_demo_corpus

        return ensure_demo_corpus(quiet=True)
    dp = run_args.get("data_path") or run_args.get("valid_data_path")
    if dp:
        return text_source(dp[-1] if isinstance(dp, (list, tuple)) else dp, {})
    raise ConversionError("--data-path: the checkpoint does not name its data; give an indexed dataset prefix or "
                          "a .txt/.jsonl file")


def text_batches(source: str, tokenizer, vocab_size: int, seq: int, mbs: int, sequences: int) -> list[Batch]:
    """Up to `sequences` sequences of seq tokens in batches of mbs: the last tokens of an indexed
    dataset (where Megatron's --split puts validation), or the first of a text/jsonl file
    (documents joined by EOD). Fewer if the data is shorter; none is a ConversionError."""
    need = sequences * seq + 1
    if os.path.isfile(source + ".idx"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(source)
        chunks, have = [], 0
        for i in range(len(ds) - 1, -1, -1):
            chunks.append(np.asarray(ds[i]))
            have += len(chunks[-1])
            if have >= need:
                break
        tokens = np.concatenate(chunks[::-1])[-need:].astype(np.int64) if chunks else np.zeros(0, np.int64)
    else:
        if tokenizer is None:
            raise ConversionError(f"--data-path {source}: a text file needs a tokenizer; the checkpoint names none "
                                  f"(give --tokenizer-type)")
        from selfmoe.data.preprocess import DataError, iter_documents

        ids: list[int] = []
        try:
            for texts in iter_documents([source]):
                ids += tokenizer.encode(" ".join(texts))
                if tokenizer.eod is not None:
                    ids.append(tokenizer.eod)
                if len(ids) >= need:
                    break
        except (DataError, ValueError, OSError) as e:
            raise ConversionError(f"--data-path {' '.join(str(e).split())}") from None
        tokens = np.asarray(ids[:need], dtype=np.int64)
    if len(tokens) and tokens.max() >= vocab_size:
        raise ConversionError(f"--data-path {source}: token id {int(tokens.max())} >= the model's vocab_size "
                              f"{vocab_size} (another tokenizer?)")
    rows = (len(tokens) - 1) // seq
    if rows < 1:
        raise ConversionError(f"--data-path {source}: fewer than --seq-length + 1 = {seq + 1} tokens")
    t = torch.from_numpy(tokens)
    x, y = t[: rows * seq].view(rows, seq), t[1: rows * seq + 1].view(rows, seq)
    return [Batch(x[i:i + mbs], y[i:i + mbs], x[i:i + mbs]) for i in range(0, rows, mbs)]


def image_batches(run_args: dict, data_path: str | None, mbs: int, n: int) -> tuple[list[Batch], list[str], str]:
    """(batches, class names, description) from pretrain_vit.py's validation split (its evaluation
    transform): the run's own images, or --data-path ROOT (ROOT/val/<class>/* or a saved dataset)."""
    import argparse

    from selfmoe.data.images import ImageDataError, open_sources
    from selfmoe.training import vit

    ns = argparse.Namespace(**run_args)
    ns.num_workers, ns.mixup, ns.cutmix, ns.skip_bad_images = 0, 0.0, 0.0, False
    try:
        if data_path:
            if not os.path.isdir(data_path):
                raise ConversionError(f"--data-path {data_path}: no such directory")
            ns.use_demo_images = False
            ns._image_sources = open_sources([data_path], "L" if ns.num_channels == 1 else "RGB")
        elif not ns.use_demo_images:
            ns._image_sources = open_sources(ns.data_path, "L" if ns.num_channels == 1 else "RGB")
        valid = vit.datasets_provider(ns, None)[1]
        total = min(n * mbs, len(valid))
        batches = []
        for start in range(0, total, mbs):
            b = valid.collate(list(range(start, min(start + mbs, total))))
            keys = torch.arange(vit_seq(run_args))[None].expand(len(b["labels"]), -1)
            batches.append(Batch(b["images"], b["labels"], keys))
    except ImageDataError as e:
        raise ConversionError(f"--data-path {e}") from None
    classes = list(getattr(valid.source, "classes", None) or range(run_args["num_classes"]))
    where = data_path or ("Fashion-MNIST validation" if ns.use_demo_images else ns.data_path[-1])
    return batches, [str(c) for c in classes], where


def vit_seq(run_args: dict) -> int:
    from selfmoe.models.vit import num_tokens

    return num_tokens(run_args["img_h"], run_args["img_w"], run_args["patch_dim"],
                      run_args.get("vit_pool", "cls") == "cls")


def patch_name(run_args: dict):
    """key -> 'cls' or 'patch r,c' (row, column of the patch grid)."""
    cls = int(run_args.get("vit_pool", "cls") == "cls")
    w = run_args["img_w"] // run_args["patch_dim"]
    return lambda k: "cls" if k < cls else f"patch {(k - cls) // w},{(k - cls) % w}"


# ---------------------------------------------------------------------------------------------
# recording

class RoutingRecorder:
    """Forward hooks on the routers of every MoE layer; `maps[layer_number] = (routed [T, E] bool,
    weights [T, E] float32)` of the last forward. `routed` is the routing decided before capacity
    (what RoutingStats counts), `weights` the probs the router returned."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        self.maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [layer.router.register_forward_hook(self._hook) for layer in self.layers]

    @torch.no_grad()
    def _hook(self, router, args, outputs):
        probs, routing_map = outputs
        E = routing_map.shape[-1]
        routed = routing_map.reshape(-1, E)
        last = getattr(router, "last_routing", None)  # same rule as RoutingStats
        if last is not None and last[1] is routing_map:
            routed = last[0].reshape(-1, E)
        self.maps[router.layer_number] = (routed.bool().cpu(), probs.reshape(-1, E).float().cpu())

    def remove(self):
        for h in self._handles:
            h.remove()


def _merge_sparse(keys: torch.Tensor, counts: torch.Tensor, new: torch.Tensor):
    """(keys, counts) + occurrences `new` -> merged unique keys and counts."""
    k, c = torch.unique(new, return_counts=True)
    keys, inv = torch.unique(torch.cat([keys, k]), return_inverse=True)
    merged = torch.zeros(len(keys), dtype=torch.int64)
    merged.index_add_(0, inv, torch.cat([counts, c]))
    return keys, merged


class KeyExpertCounts:
    """count(layer p, expert e, key v) kept sparse (vocabulary-sized key spaces), and count(v)."""

    def __init__(self, num_layers: int, num_experts: int, num_keys: int):
        self.P, self.E, self.K = num_layers, num_experts, num_keys
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.freq = torch.zeros(num_keys, dtype=torch.int64)

    def add(self, p: int, routed: torch.Tensor, keys: torch.Tensor, count_freq: bool):
        """routed [T, E] bool, keys [T] int64 of layer p."""
        t, e = routed.nonzero(as_tuple=True)
        self.keys, self.counts = _merge_sparse(self.keys, self.counts, (p * self.E + e) * self.K + keys[t])
        if count_freq:
            self.freq += torch.bincount(keys, minlength=self.K)

    def dense(self, p: int, e: int) -> torch.Tensor:
        """count(p, e, v) for every key v, [K] int64."""
        base = (p * self.E + e) * self.K
        sel = (self.keys >= base) & (self.keys < base + self.K)
        out = torch.zeros(self.K, dtype=torch.int64)
        out[self.keys[sel] - base] = self.counts[sel]
        return out

    def top(self, p: int, e: int, n: int, min_count: int = 1) -> list[tuple[int, float, int]]:
        """The n keys expert e of layer p prefers: [(key, score = count/freq, count)], best first."""
        c = self.dense(p, e)
        ok = (self.freq >= max(min_count, 1)) & (c > 0)
        v = ok.nonzero().flatten()
        score = c[v].double() / self.freq[v].double()
        order = sorted(range(len(v)), key=lambda i: (-float(score[i]), -int(c[v[i]]), int(v[i])))[:n]
        return [(int(v[i]), float(score[i]), int(c[v[i]])) for i in order]


@dataclass
class RoutingAnalysis:
    """Everything measured over the evaluated batches (see the module docstring)."""
    layer_numbers: list[int]                  # the MoE layers' numbers (1-based), rows of the tables
    num_experts: int
    num_keys: int
    counts: torch.Tensor = None               # [P, E] routed token-expert pairs (float64)
    k_hist: torch.Tensor = None               # [P, E+1] tokens routed to k experts
    top1: list = field(default_factory=list)  # per batch [T, P] int16: each token's top-1 category per layer
    by_key: KeyExpertCounts = None            # token ids / patch positions
    by_class: KeyExpertCounts | None = None   # image classes (images only)
    trace: list = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0                       # tokens (text) or images
    correct: int = 0                          # top-1 hits (images)

    def __post_init__(self):
        P, E = len(self.layer_numbers), self.num_experts
        self.counts = torch.zeros(P, E, dtype=torch.float64)
        self.k_hist = torch.zeros(P, E + 1, dtype=torch.float64)
        self.by_key = KeyExpertCounts(P, E, self.num_keys)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def experts_per_token(self) -> float:
        """Mean over MoE layers of the mean experts per token (RoutingStats' `experts_per_token`)."""
        ks = torch.arange(self.num_experts + 1, dtype=torch.float64)
        per_layer = (self.k_hist * ks).sum(1) / self.k_hist.sum(1).clamp(min=1)
        return float(per_layer.mean())

    def load_fraction(self) -> torch.Tensor:
        """[P, E]: each layer's share of routed pairs per expert (the heatmap)."""
        return self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)

    def agreement(self) -> dict:
        """{'same_top1', 'same_top1_chance', 'nmi'}: [P, P] each, from the joint top-1 histograms."""
        P, E = len(self.layer_numbers), self.num_experts
        same, nmi = torch.eye(P, dtype=torch.float64), torch.eye(P, dtype=torch.float64)
        chance = torch.eye(P, dtype=torch.float64)
        if not self.top1:
            return {"same_top1": same, "same_top1_chance": chance, "nmi": nmi}
        tops = torch.cat(self.top1).long()
        for i in range(P):
            for j in range(P):
                J = torch.bincount(tops[:, i] * (E + 1) + tops[:, j], minlength=(E + 1) ** 2).view(E + 1, E + 1).double()
                n = J.sum()
                if n == 0:
                    continue
                same[i, j] = J.diagonal().sum() / n
                pxy = J / n
                px, py = pxy.sum(1), pxy.sum(0)
                chance[i, j] = (px * py).sum()
                nz = pxy > 0
                mi = float((pxy[nz] * (pxy[nz] / (px[:, None] * py[None, :])[nz]).log()).sum())
                hx = float(-(px[px > 0] * px[px > 0].log()).sum())
                hy = float(-(py[py > 0] * py[py > 0].log()).sum())
                nmi[i, j] = 1.0 if hx == 0 and hy == 0 else (mi / math.sqrt(hx * hy) if hx > 0 and hy > 0 else 0.0)
        return {"same_top1": same, "same_top1_chance": chance, "nmi": nmi}


def top1_category(routed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T] top-1 routed expert by weight (ties: lowest index), E where no expert is routed."""
    E = routed.shape[1]
    w = torch.where(routed, weights, torch.full_like(weights, -math.inf))
    top = w.argmax(1)
    return torch.where(routed.any(1), top, torch.full_like(top, E))


def _record(a: RoutingAnalysis, maps: dict, batch: Batch, trace_limit: int, batch_index: int) -> None:
    """Add one batch's routing (maps from RoutingRecorder) to `a`; trace rows: text {batch,
    sequence, position, token, layer, experts, weights}, images the image's class for the token."""
    b, s = batch.keys.shape
    keys = batch.keys.t().reshape(-1).long()  # s-major, as the MoE layer flattens [s, b, H]
    E = a.num_experts
    tops = []
    for p, ln in enumerate(a.layer_numbers):
        routed, weights = maps[ln]
        a.counts[p] += routed.sum(0).double()
        a.k_hist[p] += torch.bincount(routed.sum(1), minlength=E + 1).double()
        a.by_key.add(p, routed, keys, count_freq=p == 0)
        if a.by_class is not None:
            classes = batch.labels.long().repeat(s)  # row t is sequence t % b
            a.by_class.add(p, routed, classes, count_freq=p == 0)
        tops.append(top1_category(routed, weights))
    a.top1.append(torch.stack(tops, 1).to(torch.int16))
    # trace: sequence by sequence, position by position, until the limit
    for seq in range(b):
        for pos in range(s):
            if len(a.trace) >= trace_limit * len(a.layer_numbers):
                return
            t = pos * b + seq
            who = {"token": int(keys[t])} if a.by_class is None else {"class": int(batch.labels[seq])}
            for ln in a.layer_numbers:
                routed, weights = maps[ln]
                experts = routed[t].nonzero().flatten().tolist()
                a.trace.append({"batch": batch_index, "sequence": seq, "position": pos, **who, "layer": ln,
                                "experts": experts, "weights": [round(float(weights[t, e]), 6) for e in experts]})


def forward_loss(model, family: str, batch: Batch) -> tuple[float, int, int]:
    """(summed loss, count, top-1 hits) of one batch: LM cross entropy summed over tokens (text),
    classification cross entropy summed over images (images)."""
    if family == "text":
        ids = batch.inputs
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        losses = model(ids, pos, None, labels=batch.labels)
        return float(losses.float().sum()), ids.numel(), 0
    logits = model(batch.inputs).float()
    loss = F.cross_entropy(logits, batch.labels, reduction="sum")
    return float(loss), len(batch.labels), int((logits.argmax(-1) == batch.labels).sum())


@torch.no_grad()
def analyze(model, family: str, batches: list[Batch], num_keys: int, num_classes: int | None = None,
            trace_tokens: int = 0, progress=None) -> RoutingAnalysis:
    """Run `batches` through `model` (eval mode, no grad) and measure its routing.

    family: "text" or "images"; num_keys: vocabulary size (text) or tokens per image (images);
    trace_tokens: how many tokens (each with one row per MoE layer) the trace keeps;
    progress(done, total, tokens_done): called after each batch.
    Raises ConversionError if the model has no MoE layer.
    """
    model.eval()
    rec = RoutingRecorder(model)
    if not rec.layers:
        rec.remove()
        raise ConversionError("the model has no MoE layer: nothing to analyze")
    E = rec.layers[0].router.config.num_moe_experts
    a = RoutingAnalysis(sorted(layer.router.layer_number for layer in rec.layers), E, num_keys)
    if family == "images":
        a.by_class = KeyExpertCounts(len(a.layer_numbers), E, num_classes)
    try:
        for i, batch in enumerate(batches):
            rec.maps.clear()
            loss, n, hits = forward_loss(model, family, batch)
            a.loss_sum += loss
            a.loss_count += n
            a.correct += hits
            _record(a, rec.maps, batch, trace_tokens, i)
            if progress is not None:
                progress(i + 1, len(batches), sum(b.keys.numel() for b in batches[:i + 1]))
    finally:
        rec.remove()
    return a


@torch.no_grad()
def theta_sweep(model, family: str, batches: list[Batch], thetas: list[float], progress=None) -> list[dict]:
    """Routing-Free θ at evaluation (Liu et al. 2026, arXiv 2604.00801): for each θ, the mean loss
    and the mean experts per token (RoutingStats' measure) on `batches`; θ is restored after.
    progress(row) is called after each θ."""
    from selfmoe.metrics import RoutingStats
    from selfmoe.routers.routing_free import routing_free_routers, set_theta

    rf = routing_free_routers(model)
    if not rf:
        raise ConversionError("θ is Routing-Free's threshold; this model has no Routing-Free router")
    original = rf[0].theta
    cfg = rf[0].config
    stats = RoutingStats(model, cfg.num_layers, cfg.num_moe_experts)
    rows = []
    try:
        for theta in thetas:
            set_theta(model, theta)
            stats.reset()
            total, count = 0.0, 0
            for batch in batches:
                loss, n, _ = forward_loss(model, family, batch)
                total, count = total + loss, count + n
            m = stats.reduce()
            rows.append(dict(theta=theta, loss=total / max(count, 1), experts_per_token=m["experts_per_token"],
                             density=m["density"]))
            if progress is not None:
                progress(rows[-1])
    finally:
        stats.remove()
        set_theta(model, original)
    return rows


# ---------------------------------------------------------------------------------------------
# outputs

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_load(a: RoutingAnalysis, path: str, title: str) -> None:
    plt = _plt()
    frac = a.load_fraction().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * a.num_experts + 2), max(2.5, 0.4 * len(a.layer_numbers) + 1.5)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(a.num_experts))
    ax.set_yticks(range(len(a.layer_numbers)), [str(n) for n in a.layer_numbers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of the layer's routed pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_experts_per_token(a: RoutingAnalysis, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ks = np.arange(a.num_experts + 1)
    width = 0.8 / len(a.layer_numbers)
    for p, ln in enumerate(a.layer_numbers):
        frac = (a.k_hist[p] / a.k_hist[p].sum().clamp(min=1)).numpy()
        ax.bar(ks + (p - (len(a.layer_numbers) - 1) / 2) * width, frac, width, label=f"layer {ln}")
    ax.set_xlabel("experts per token")
    ax.set_ylabel("fraction of tokens")
    ax.set_xticks(ks)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_agreement(a: RoutingAnalysis, agreement: dict, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    labels = [str(n) for n in a.layer_numbers]
    for ax, (name, m) in zip(axes, (("same top-1 expert", agreement["same_top1"]), ("NMI of top-1", agreement["nmi"]))):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        if len(labels) <= 8:
            for (i, j), v in np.ndenumerate(m.numpy()):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_theta_sweep(rows: list[dict], path: str, loss_name: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["experts_per_token"] for r in rows]
    y = [r["loss"] for r in rows]
    ax.plot(x, y, "o-")
    for r in rows:
        ax.annotate(f"θ={r['theta']:g}", (r["experts_per_token"], r["loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean active experts per token")
    ax.set_ylabel(loss_name)
    ax.set_title("Routing-Free: θ sweep", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def top_table(a: RoutingAnalysis, counter: KeyExpertCounts, n: int, min_count: int, name) -> list[dict]:
    """Rows {layer, expert, top: [{key, name, score, count}]} for every MoE layer and expert."""
    rows = []
    for p, ln in enumerate(a.layer_numbers):
        for e in range(a.num_experts):
            rows.append({"layer": ln, "expert": e, "top": [
                {"key": v, "name": name(v), "score": round(s, 6), "count": c}
                for v, s, c in counter.top(p, e, n, min_count)]})
    return rows


def summary_text(a: RoutingAnalysis, agreement: dict, info: dict, sweep: list[dict] | None,
                 tables: dict) -> str:
    from selfmoe.metrics import routing_metrics

    m = routing_metrics(a.counts, a.k_hist)
    L = [f"routing analysis of {info['checkpoint']} (iteration {info['iteration']}, {info['router']} router, "
         f"{a.num_experts} experts, MoE layers {','.join(map(str, a.layer_numbers))})",
         f"data: {info['data']} | {info['batches']} batches, {info['sequences']:,} "
         f"{'sequences' if info['family'] == 'text' else 'images'}, {info['tokens']:,} tokens"]
    loss = f"{info['loss_name']} {a.loss:.4f}"
    if info["family"] == "text":
        loss += f" (PPL {math.exp(min(a.loss, 50)):.2f})"
    else:
        loss += f" (top-1 {100 * a.correct / max(a.loss_count, 1):.2f}%)"
    L.append(loss)
    L.append(f"mean over layers: normalized entropy {m['normalized_entropy']:.3f} | max overload "
             f"{m['max_overload']:.2f} | dead experts {m['dead_experts']:.2f} | experts per token "
             f"{m['experts_per_token']:.3f} (p50 {m['experts_per_token_p50']:.1f}, p99 {m['experts_per_token_p99']:.1f})")
    for p, ln in enumerate(a.layer_numbers):
        lm = m["layers"].get(p + 1, {})  # routing_metrics numbers its rows from 1
        if lm:
            L.append(f"  layer {ln}: entropy {lm['normalized_entropy']:.3f} | max overload {lm['max_overload']:.2f} | "
                     f"dead {lm['dead_experts']} | experts/token {lm['experts_per_token']:.3f}")
    P = len(a.layer_numbers)
    if P > 1:
        off = ~torch.eye(P, dtype=torch.bool)
        L.append(f"layer agreement (off-diagonal mean): same top-1 {float(agreement['same_top1'][off].mean()):.3f} "
                 f"({float(agreement['same_top1_chance'][off].mean()):.3f} if independent) | "
                 f"NMI {float(agreement['nmi'][off].mean()):.3f}")
    for kind, rows in tables.items():
        first = next((r for r in rows if r["top"]), None)
        if first:
            L.append(f"e.g. layer {first['layer']} expert {first['expert']} prefers "
                     f"({'classes' if kind == 'by_class' else 'tokens' if info['family'] == 'text' else 'patches'}, "
                     f"share routed there): "
                     + ", ".join(f"{t['name']!r} {t['score']:.2f}" for t in first["top"][:5]) + " (top_tokens.txt)")
    if sweep:
        L.append("θ sweep: " + " | ".join(f"θ={r['theta']:g}: loss {r['loss']:.4f}, experts/token "
                                          f"{r['experts_per_token']:.3f}" for r in sweep))
    return "\n".join(L) + "\n"


def write_outputs(out_dir: str, a: RoutingAnalysis, info: dict, key_name, class_name=None,
                  sweep: list[dict] | None = None, top_n: int = 10, min_count: int = 5) -> str:
    """Write every artefact into the (new, empty) directory `out_dir`; returns the summary text.

    load.png/.csv, experts_per_token.png/.csv, agreement.png, top_tokens.json/.txt, trace.jsonl,
    theta_sweep.png/.csv (if swept), routing.json (all numbers), summary.txt.
    """
    agreement = a.agreement()
    title = f"{info['router']} router: expert load per layer ({info['tokens']:,} tokens)"
    plot_load(a, os.path.join(out_dir, "load.png"), title)
    plot_experts_per_token(a, os.path.join(out_dir, "experts_per_token.png"))
    if len(a.layer_numbers) > 1:
        plot_agreement(a, agreement, os.path.join(out_dir, "agreement.png"))
    frac = a.load_fraction()
    with open(os.path.join(out_dir, "load.csv"), "w") as f:
        f.write("layer," + ",".join(f"expert_{e}" for e in range(a.num_experts)) + ",routed_pairs\n")
        for p, ln in enumerate(a.layer_numbers):
            f.write(f"{ln}," + ",".join(f"{x:.6f}" for x in frac[p].tolist()) + f",{int(a.counts[p].sum())}\n")
    with open(os.path.join(out_dir, "experts_per_token.csv"), "w") as f:
        f.write("layer," + ",".join(f"k_{k}" for k in range(a.num_experts + 1)) + "\n")
        for p, ln in enumerate(a.layer_numbers):
            f.write(f"{ln}," + ",".join(str(int(x)) for x in a.k_hist[p].tolist()) + "\n")
    top = top_table(a, a.by_key, top_n, min_count, key_name)
    tables = {"by_key": top}
    if a.by_class is not None:
        tables["by_class"] = top_table(a, a.by_class, top_n, 1, class_name)
    with open(os.path.join(out_dir, "top_tokens.json"), "w") as f:
        json.dump({"score": "count(key routed to expert) / count(key)", "min_count": min_count, **tables}, f, indent=1)
    with open(os.path.join(out_dir, "top_tokens.txt"), "w") as f:
        for kind, rows in tables.items():
            f.write(f"# {kind}: score = count(routed to the expert) / count(seen); min count {min_count if kind == 'by_key' else 1}\n")
            for r in rows:
                f.write(f"layer {r['layer']} expert {r['expert']}: "
                        + ", ".join(f"{t['name']!r} {t['score']:.2f} ({t['count']})" for t in r["top"]) + "\n")
    with open(os.path.join(out_dir, "trace.jsonl"), "w") as f:
        for row in a.trace:
            f.write(json.dumps(row) + "\n")
    if sweep:
        plot_theta_sweep(sweep, os.path.join(out_dir, "theta_sweep.png"), info["loss_name"])
        with open(os.path.join(out_dir, "theta_sweep.csv"), "w") as f:
            f.write("theta,loss,experts_per_token,density\n")
            for r in sweep:
                f.write(f"{r['theta']},{r['loss']:.6f},{r['experts_per_token']:.6f},{r['density']:.6f}\n")
    numbers = {**info, "layers": a.layer_numbers, "num_experts": a.num_experts, "loss": a.loss,
               "experts_per_token": a.experts_per_token(), "counts": a.counts.tolist(), "k_hist": a.k_hist.tolist(),
               "load_fraction": frac.tolist(), "same_top1": agreement["same_top1"].tolist(),
               "same_top1_chance": agreement["same_top1_chance"].tolist(), "nmi": agreement["nmi"].tolist(),
               "theta_sweep": sweep or []}
    if info["family"] == "images":
        numbers["top1_accuracy"] = a.correct / max(a.loss_count, 1)
    with open(os.path.join(out_dir, "routing.json"), "w") as f:
        json.dump(numbers, f, indent=1)
    text = summary_text(a, agreement, info, sweep, tables)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text)
    return text
