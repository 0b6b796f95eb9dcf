"""What a run prints and writes to TensorBoard, kept apart from the loop so the loop stays short.

Console: one line per log interval, a line per validation, parameter counts at the start and a
summary at the end, all from the last rank (it holds the loss, as in Megatron-LM).
TensorBoard: Megatron-LM's scalar names where they exist (`lm loss`, `learning-rate`,
`grad-norm`, `iteration-time`, `lm loss validation`, `lm loss validation ppl`) plus `routing/*`
(with each MoE layer's expert load fractions), `parameters/{total,active,router}`, and the run's
arguments as text, one tag per argument (Megatron-LM's write_args_to_tensorboard), so that a
report can be built from the event files alone (tools/compare_routers.py --from-tensorboard).
"""

from __future__ import annotations

import math
import time

from selfmoe.training.distributed import is_last_rank, print_rank_last


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))  # Megatron-LM clamps the exponent at 20


class TrainingLogger:
    def __init__(self, args, tokens_per_iteration: int, loss_name: str = "lm loss", unit: str = "tokens"):
        self.args = args
        self.unit = unit  # what tokens_per_iteration counts: "tokens" (GPT) or "images" (ViT)
        self.loss_name = loss_name  # the forward step's report key, and the TensorBoard name
        self.tokens_per_iteration = tokens_per_iteration
        self.writer = None
        if args.tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
            for name, value in sorted(vars(args).items()):  # as Megatron-LM: one text tag per argument
                if not name.startswith("_") and isinstance(value, (int, float, str, bool, type(None), list, tuple)):
                    self.writer.add_text(name, str(value), 0)
        self.history: list[tuple[int, float]] = []  # (iteration, lm loss) of every trained iteration
        self.validation: list[tuple[int, float]] = []
        self.validation_metrics: dict = {}  # the last validation's extra metrics (top-1, top-5)
        self.last_routing: dict = {}
        self._reset_interval()
        self.start_time = None
        self.start_iteration = 0
        self.train_seconds = 0.0  # inside train steps only: throughput excludes validation and saving

    def _reset_interval(self):
        self.iv_loss, self.iv_n, self.iv_grad, self.iv_grad_n, self.iv_skipped = 0.0, 0, 0.0, 0, 0
        self.iv_aux: dict = {}
        self.iv_start = time.time()
        self.iv_iters = 0
        self.iv_step_seconds = 0.0

    def start(self, iteration: int):
        self.start_time = time.time()
        self.start_iteration = iteration
        self.iv_start = self.start_time

    def scalar(self, name: str, value, iteration: int):
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, float(value), iteration)

    # --------------------------------------------------------------------------------------
    def print_parameter_counts(self, counts: dict, router_type: str | None):
        router = f" | router {human(counts['router'])} ({router_type})" if router_type else " | dense"
        print_rank_last(f"parameters: total {human(counts['total'])} | active per token {human(counts['active'])}"
                        f"{router}")
        for key in ("total", "active", "router"):  # constant over a run; step 0
            self.scalar(f"parameters/{key}", counts[key], 0)

    def iteration(self, iteration: int, loss: float | None, lr: float, grad_norm: float | None, skipped: bool,
                  aux_losses: dict, step_seconds: float):
        """Called every iteration; writes per-iteration scalars (Megatron's --tensorboard-log-interval)."""
        self.iv_iters += 1
        self.iv_step_seconds += step_seconds
        self.train_seconds += step_seconds
        if skipped:
            self.iv_skipped += 1
        elif loss is not None:
            self.iv_loss += loss
            self.iv_n += 1
            self.history.append((iteration, loss))
        if grad_norm is not None and math.isfinite(grad_norm):
            self.iv_grad += grad_norm
            self.iv_grad_n += 1
        for k, v in aux_losses.items():
            self.iv_aux[k] = self.iv_aux.get(k, 0.0) + v
        if iteration % self.args.tensorboard_log_interval == 0:
            if loss is not None and not skipped:
                self.scalar(self.loss_name, loss, iteration)
            self.scalar("learning-rate", lr, iteration)
            self.scalar("grad-norm", grad_norm, iteration)
            for k, v in aux_losses.items():
                self.scalar(k, v, iteration)

    def interval(self, iteration: int, lr: float, routing: dict | None):
        """The one console line of a log interval, and the interval's averaged scalars."""
        elapsed = time.time() - self.iv_start  # wall time, validation and saving included: for the ETA
        eta = elapsed / max(1, self.iv_iters) * (self.args.train_iters - iteration)
        per_iter = self.iv_step_seconds / max(1, self.iv_iters)
        tokens_per_s = self.iv_iters * self.tokens_per_iteration / max(self.iv_step_seconds, 1e-9)
        self.scalar("iteration-time", per_iter, iteration)
        self.scalar(f"throughput/{self.unit}-per-sec", tokens_per_s, iteration)
        self.scalar("skipped-iterations", self.iv_skipped, iteration)
        width = len(str(self.args.train_iters))
        parts = [f"iteration {iteration:>{width}}/{self.args.train_iters}"]
        parts.append(f"{self.loss_name} {self.iv_loss / self.iv_n:.6E}" if self.iv_n else f"{self.loss_name} nan")
        parts.append(f"lr {lr:.3E}")
        parts.append(f"grad norm {self.iv_grad / self.iv_grad_n:.3f}" if self.iv_grad_n else "grad norm -")
        parts.append(f"{tokens_per_s:,.0f} {'tok' if self.unit == 'tokens' else 'img'}/s")
        parts.append(f"ETA {duration(eta)}")
        if routing:
            self.log_routing(routing, iteration)
            parts.append(f"routing entropy {routing['normalized_entropy']:.3f}")
            if "lambda" in routing:
                parts.append(f"density {routing['density']:.3f} lambda {routing['lambda']:.2E}")
            if routing.get("dropped_fraction"):  # token-expert pairs over capacity, of those routed
                parts.append(f"dropped {100 * routing['dropped_fraction']:.1f}%")
        if self.iv_skipped:
            parts.append(f"skipped {self.iv_skipped} (NaN/Inf)")
        print_rank_last(" | ".join(parts))
        self._reset_interval()

    def log_routing(self, m: dict, iteration: int):
        self.last_routing = m
        for key in ("normalized_entropy", "max_overload", "experts_per_token", "cv", "dead_experts",
                    "dropped_fraction"):
            self.scalar(f"routing/{key}", m.get(key), iteration)
        for layer, lm in m.get("layers", {}).items():
            self.scalar(f"routing/normalized_entropy/layer_{layer}", lm["normalized_entropy"], iteration)
            for expert, f in enumerate(lm.get("load_fraction", ())):  # share of the layer's routed pairs
                self.scalar(f"routing/load_fraction/layer_{layer}/expert_{expert}", f, iteration)
        if "lambda" in m:  # Routing-Free
            self.scalar("routing/density", m.get("density"), iteration)
            self.scalar("routing/lambda", m["lambda"], iteration)

    def validation_result(self, iteration: int, loss: float, label: str = "validation", metrics: dict | None = None):
        self.validation.append((iteration, loss))
        self.scalar(f"{self.loss_name} {label}", loss, iteration)
        line = f"{label} at iteration {iteration} | {self.loss_name} {loss:.6E}"
        if self.unit == "tokens":  # perplexity is a language-model metric
            ppl = perplexity(loss)
            self.scalar(f"{self.loss_name} {label} ppl", ppl, iteration)
            line += f" | {self.loss_name} PPL {ppl:.3f}"
        for k, v in (metrics or {}).items():  # accuracies as percentages (top-1, top-5)
            self.scalar(f"{k} {label}", 100 * v, iteration)
            line += f" | {k} {100 * v:.2f}%"
        self.validation_metrics = dict(metrics or {})
        print_rank_last(line)

    def print(self, msg: str):
        print_rank_last(msg)

    def summary(self, iteration: int, checkpoint: str | None) -> dict:
        elapsed = time.time() - (self.start_time or time.time())
        trained = iteration - self.start_iteration
        out = {
            "iterations": trained, "seconds": elapsed,
            f"{self.unit}_per_s": trained * self.tokens_per_iteration / max(self.train_seconds, 1e-9),
            "final_val_loss": self.validation[-1][1] if self.validation else None,
            "final_train_loss": self.history[-1][1] if self.history else None,
            "routing_entropy": self.last_routing.get("normalized_entropy"),
        }
        out["final_val_ppl"] = perplexity(out["final_val_loss"]) if out["final_val_loss"] is not None else None
        out.update({f"final_val_{k}": v for k, v in self.validation_metrics.items()})
        parts = [f"summary: {trained} iterations in {duration(elapsed)}"]
        if out["final_val_loss"] is not None and self.unit != "tokens":
            parts.append(f"final validation {self.loss_name} {out['final_val_loss']:.4f}" +
                         "".join(f" {k} {100 * v:.2f}%" for k, v in self.validation_metrics.items()))
        elif out["final_val_ppl"] is not None:
            parts.append(f"final validation {self.loss_name} {out['final_val_loss']:.4f} PPL {out['final_val_ppl']:.2f}")
        if out["routing_entropy"] is not None:
            parts.append(f"routing entropy {out['routing_entropy']:.3f}")
        parts.append(f"{out[f'{self.unit}_per_s']:,.0f} {self.unit}/s")
        if checkpoint:
            parts.append(f"checkpoint {checkpoint}")
        if self.args.tensorboard_dir:
            parts.append(f"tensorboard {self.args.tensorboard_dir}")
        print_rank_last(" | ".join(parts))
        return out

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
