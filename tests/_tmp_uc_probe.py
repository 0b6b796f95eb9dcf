import os, sys, glob, torch, pytest
import torch.multiprocessing as mp_
import test_universal_checkpoint as T
from conftest import free_port

MODE = os.environ.get("PROBE", "none")

def perturb(folder):
    zero = os.path.join(folder, "zero")
    for d in sorted(glob.glob(os.path.join(zero, "*"))):
        if not os.path.isdir(d) or not os.path.exists(os.path.join(d, "exp_avg.pt")):
            continue
        if MODE == "zero_moments":
            for key in ("exp_avg", "exp_avg_sq"):
                f = os.path.join(d, f"{key}.pt"); sd = torch.load(f, weights_only=False); sd["param"] = torch.zeros_like(sd["param"]); torch.save(sd, f)
        elif MODE == "step0":
            f = os.path.join(d, "step.pt")
            if os.path.exists(f): torch.save(torch.zeros_like(torch.as_tensor(torch.load(f, weights_only=False))) if torch.is_tensor(torch.load(f, weights_only=False)) else 1, f)
        elif MODE == "swap_halves" and d.endswith("mlp.experts.local_experts.0.linear_fc1.weight"):
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = os.path.join(d, f"{key}.pt"); sd = torch.load(f, weights_only=False); p = sd["param"]; n = p.shape[0] // 2
                sd["param"] = torch.cat([p[n:], p[:n]]); torch.save(sd, f)
        elif MODE == "moment_1e-3" :
            for key in ("exp_avg",):
                f = os.path.join(d, f"{key}.pt"); sd = torch.load(f, weights_only=False); sd["param"] = sd["param"] * 1.001; torch.save(sd, f)

orig = T.convert
def convert(root, tag):
    out = orig(root, tag); perturb(out); return out
T.convert = convert

def test_probe(tmp_path):
    root = str(tmp_path / "ckpt")
    mp_.spawn(T._worker, args=(2, free_port(), root, str(tmp_path / "s.pt")), nprocs=2, join=True)
    for stage in T.STAGES:
        T.convert(os.path.join(root, f"zero{stage}"), f"step{T.BEFORE}")
    mp_.spawn(T._worker, args=(1, free_port(), root, str(tmp_path / "r.pt")), nprocs=1, join=True)
    s, r = torch.load(tmp_path / "s.pt"), torch.load(tmp_path / "r.pt")
    for stage in T.STAGES:
        a, b = s[stage], r[stage]
        dl = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        dw = max((a["weights_after_1"][k] - b["weights_after_1"][k]).abs().max().item() for k in a["weights_after_1"])
        eq = {key: all(torch.equal(a["at_ckpt"][key][k], b["at_ckpt"][key][k]) for k in a["at_ckpt"][key]) for key in ("module", "fp32", "exp_avg", "exp_avg_sq")}
        print(f"\nPROBE {MODE} zero{stage}: max|dloss|={dl:.3e} max|dw|={dw:.3e} exact={eq} steps={a['at_ckpt']['adam_steps']},{b['at_ckpt']['adam_steps']}")
