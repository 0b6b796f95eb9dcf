"""How many of Megatron-LM's pretraining flags selfmoe honours, lists as ignored, or does not know.

    python tools/flag_coverage.py --megatron-lm /path/to/Megatron-LM [--unknown]

Megatron-LM's flags are read from its source (megatron/training/arguments.py and the config
dataclasses its ArgumentGroupFactory turns into flags), without importing it: it is not a
dependency here. Each flag is then looked up in selfmoe's parser:
- honoured: accepted and taken into account on every device;
- CUDA only: accepted, honoured when CUDA (for TransformerEngine-spec flags: TE and CUDA) is
  present, listed as ignored without it;
- ignored: accepted and listed at start-up as ignored, with the reason;
- unknown: refused by the parser (`error: unrecognized arguments`).
Counts are by Megatron-LM's argument group (its `_add_<group>_args` functions).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections import Counter, defaultdict

_ADD_ARGUMENT = re.compile(r"add_argument\(\s*((?:['\"]--?[A-Za-z0-9_-]+['\"]\s*,\s*)+)")


def _dataclass_fields(tree_by_class: dict, name: str) -> list:
    """[(field, annotation source, default node, argparse_meta arg_names)] of a class and its bases."""
    node, src = tree_by_class.get(name, (None, None))
    if node is None:
        return []
    out = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            out += _dataclass_fields(tree_by_class, base.id)
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        default, names = stmt.value, None
        if isinstance(default, ast.Call) and getattr(default.func, "id", "") == "field":
            kw = {k.arg: k.value for k in default.keywords}
            default = kw.get("default")
            meta = kw.get("metadata")
            if isinstance(meta, ast.Dict):
                for k, v in zip(meta.keys, meta.values):
                    if getattr(k, "value", None) == "argparse_meta" and isinstance(v, ast.Dict):
                        for k2, v2 in zip(v.keys, v.values):
                            if getattr(k2, "value", None) == "arg_names":
                                names = [e.value for e in v2.elts]
        out.append((stmt.target.id, ast.get_source_segment(src, stmt.annotation) or "", default, names))
    return out


def _flags_of_field(field, annotation, default, names):
    if field.startswith("_"):
        return []
    if names:
        return [names[0]]
    is_bool = annotation.strip() in ("bool", "Optional[bool]", "bool | None")
    if is_bool and isinstance(default, ast.Constant) and default.value is True:
        return ["--no-" + field.replace("_", "-")]
    return ["--" + field.replace("_", "-")]


def megatron_lm_flags(root: str) -> dict:
    """{group: [flags]} of Megatron-LM's pretraining parser, from its source."""
    classes = {}
    for rel in ("megatron/core/transformer/transformer_config.py", "megatron/core/model_parallel_config.py",
                *[os.path.join("megatron/training/config", f) for f in
                  sorted(os.listdir(os.path.join(root, "megatron/training/config")))]):
        path = os.path.join(root, rel)
        if not path.endswith(".py") or not os.path.isfile(path):
            continue
        src = open(path).read()
        for node in ast.parse(src).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (node, src)
    src = open(os.path.join(root, "megatron/training/arguments.py")).read()
    tree = ast.parse(src)
    groups = {}
    for fn in tree.body:
        m = re.fullmatch(r"_add_(\w+)_args", getattr(fn, "name", ""))
        if not isinstance(fn, ast.FunctionDef) or not m:
            continue
        body = ast.get_source_segment(src, fn)
        flags = [f.strip("'\" ") for call in _ADD_ARGUMENT.findall(body) for f in call.split(",")[:1]]
        lists = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and len(node.targets) == 1:
                lists[getattr(node.targets[0], "id", "")] = {getattr(e, "value", None) for e in node.value.elts}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ArgumentGroupFactory":
                cls = getattr(node.args[0], "id", "")
                exclude = set()
                for k in node.keywords:
                    if k.arg == "exclude":
                        exclude = lists.get(getattr(k.value, "id", ""), set()) if isinstance(k.value, ast.Name) \
                            else {getattr(e, "value", None) for e in k.value.elts}
                for field, ann, default, names in _dataclass_fields(classes, cls):
                    if field not in exclude:
                        flags += _flags_of_field(field, ann, default, names)
        groups[m.group(1)] = sorted(set(f for f in flags if f.startswith("--")))
    return groups


def classify(flag: str, parser, ignored: set, derived_needs: dict) -> str:
    action = parser._option_string_actions.get(flag)
    if action is None:
        return "unknown"
    if flag in ignored:
        return "ignored"
    needs = derived_needs.get(action.dest)
    if needs in ("cuda", "te"):  # "te": honoured with megatron-core's TransformerEngine spec (TE + CUDA)
        return "CUDA only"
    if needs == "needs --multi-latent-attention":  # MLATransformerConfig's own fields: honoured under MLA
        return "honoured"
    if needs:
        return "ignored"
    if action.dest in ("use_legacy_models",):
        return "refused"
    return "honoured"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--megatron-lm", required=True, help="a Megatron-LM checkout")
    p.add_argument("--unknown", action="store_true", help="also list the unknown flags per group")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.megatron_lm, "megatron/training/arguments.py")):
        print(f"error: --megatron-lm {a.megatron_lm}: no megatron/training/arguments.py there", file=sys.stderr)
        sys.exit(2)

    from selfmoe.training import config_flags
    from selfmoe.training.arguments import IGNORED_FLAGS, build_parser

    parser = build_parser()
    needs = {d.field: d.needs for d in config_flags.derived_flags()}
    groups = megatron_lm_flags(a.megatron_lm)
    kinds = ("honoured", "CUDA only", "ignored", "refused", "unknown")
    total, unknown = Counter(), defaultdict(list)
    print(f"{'group':<32}{'flags':>6}" + "".join(f"{k:>11}" for k in kinds))
    seen = set()
    for group, flags in groups.items():
        flags = [f for f in flags if f not in seen]
        seen.update(flags)
        if not flags:
            continue
        c = Counter(classify(f, parser, set(IGNORED_FLAGS), needs) for f in flags)
        unknown[group] = [f for f in flags if classify(f, parser, set(IGNORED_FLAGS), needs) == "unknown"]
        total.update(c)
        total["flags"] += len(flags)
        print(f"{group:<32}{len(flags):>6}" + "".join(f"{c[k]:>11}" for k in kinds))
    print(f"{'total':<32}{total['flags']:>6}" + "".join(f"{total[k]:>11}" for k in kinds))
    if a.unknown:
        for group, flags in unknown.items():
            if flags:
                print(f"\n{group}: {' '.join(flags)}")


if __name__ == "__main__":
    main()
