"""How close a data-flow export is to the model the search scored, by path depth, on a real model.

A data-flow search scores a path assembled from the donors' layers, scaling each layer's input
(the hidden state it receives) by the path's scale; the export folds each scale into the
weights that write into the residual stream (or the norms before them) and writes an ordinary
model. Both are float32 computations of the same function, rounded differently, and the
difference grows with depth. This measures, on the real-model bed (SmolLM2-135M-Instruct and
its two fine-tuned experts, ``benchmarks/real_smollm2.py build``), for random paths of several
depths with scales drawn from the DFS spaces' range [0.5, 1.5]:

- the largest |logit difference| between the export (loaded with ``AutoModelForCausalLM``) and
  the search-time model, over every position of a batch of the tasks' questions;
- the same for the search-time model itself against a float64 evaluation of the same path: the
  float32 rounding the search already carries, the yardstick for the export's;
- the logits' own scale (largest |logit|) and whether the greedy next token agrees everywhere.

Usage: python benchmarks/dfs_export_depth.py [--root DIR] [--depths 10 30 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.merge.dataflow import DataFlowModel, build_shell, load_donors  # noqa: E402
from evomerge.recipe import DFSRecipe, PathStep  # noqa: E402

DEFAULT_ROOT = ROOT / "benchmarks" / "real" / "smollm2-v1"
MODELS = ("base", "expert_a", "expert_b")


def random_path(depth: int, layers: int, rng: random.Random) -> DFSRecipe:
    """``depth`` steps through the donors' layers in order of depth (as the paper's slots run),
    each from a random donor, with a random input scale in [0.5, 1.5]."""
    steps = tuple(PathStep(model=rng.choice(MODELS), layer=min(layers - 1, i * layers // depth),
                           scale=round(rng.uniform(0.5, 1.5), 4)) for i in range(depth))
    return DFSRecipe(embed_from="base", layers=steps)


def questions(root: Path, n: int) -> list[str]:
    """``n`` questions of the target task's search split (the text a search scores)."""
    path = next((root / "tasks").rglob("*arith_lune*search*.jsonl"))
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [next(v for k, v in row.items() if isinstance(v, str) and len(v) > 10) for row in rows]


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 30, 60])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    import transformers as T

    dirs = {m: str(args.root / m) for m in MODELS}
    if not all(Path(d, "config.json").is_file() for d in dirs.values()):
        sys.exit(f"no bed under {args.root}: run python benchmarks/real_smollm2.py build")
    tokenizer = T.AutoTokenizer.from_pretrained(dirs["base"])
    batch = tokenizer(questions(args.root, args.batch), return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    searched32 = DataFlowModel(load_donors(dirs), build_shell(dirs["base"]))
    exact64 = DataFlowModel(load_donors(dirs, dtype=torch.float64), build_shell(dirs["base"], torch.float64))
    layers = searched32.num_layers("base")
    rng = random.Random(args.seed)
    print(f"SmolLM2-135M-Instruct bed ({layers} layers per donor), {ids.shape[0]} questions x {ids.shape[1]} "
          f"tokens, float32, scales in [0.5, 1.5], seed {args.seed}")
    print("| path depth | max abs logit diff, export vs search | search vs float64 | export vs float64 | "
          "max abs logit | same greedy token |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        recipe = random_path(depth, layers, rng)
        keep = mask.bool()
        search = searched32.assemble(recipe)(input_ids=ids, attention_mask=mask).logits[keep]
        exact = exact64.assemble(recipe)(input_ids=ids, attention_mask=mask).logits[keep]
        with tempfile.TemporaryDirectory() as tmp:
            searched32.export(recipe, Path(tmp) / "out")
            model = T.AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.float32).eval()
            exported = model(input_ids=ids, attention_mask=mask).logits[keep]
            del model
        same = bool((exported.argmax(-1) == search.argmax(-1)).all())
        print(f"| {depth} | {(exported - search).abs().max().item():.2e} | {(search - exact).abs().max().item():.2e} | "
              f"{(exported - exact).abs().max().item():.2e} | {search.abs().max().item():.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
