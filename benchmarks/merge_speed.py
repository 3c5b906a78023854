"""Merge speed: evomerge's in-memory candidate path vs mergekit-yaml, and vs the memory floor.

(a) Always: on the cross-skill zoo's models (CPU), or on an experiment's own sources
    (``--experiment EXP``: its base and first two other sources, in its dtype), for every
    method, the seconds evomerge takes to write one candidate into a preallocated model
    (``ResidentSources.merge_into``: sources resident, no disk), beside the memory floor for
    the same bytes (bytes read + written over this machine's copy bandwidth, measured in the
    same run) and ``mergekit-yaml`` merging the same recipe (the YAML ``evomerge export
    --format mergekit`` writes), and the ratios. The mergekit figure is the whole command
    (process start, reading and writing safetensors): what a search that shells out to
    mergekit per candidate pays.
(b) With a CUDA device: Llama-7B tensor shapes (32 layers, hidden 4096, MLP 11008, vocab
    32000), bf16, 3 sources (base + 2), random weights on the GPU; seconds per candidate per
    method and the ratio to the byte floor: (bytes read + written) / measured device bandwidth
    (a device-to-device copy). Goals: linear / task_arithmetic <= 1.5x the floor, TIES / DARE
    <= 3x.

Usage: python benchmarks/merge_speed.py [--experiment EXP.yaml] [--repeats 5] [--skip-mergekit] [--gpu-only]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.architecture import BY_NAME  # noqa: E402
from evomerge.mergekit_config import mergekit_yaml  # noqa: E402
from evomerge.merge.backend import ResidentSources  # noqa: E402
from evomerge.recipe import ModelParams, Recipe  # noqa: E402

RECIPES = {  # method -> (per-model parameters for expert_a, expert_b; global parameters)
    "linear": ({"weight": 0.6}, {"weight": 0.4}, {}),
    "task_arithmetic": ({"weight": 0.8}, {"weight": 0.5}, {}),
    "ties": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "dare_ties": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "dare_linear": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "breadcrumbs": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "breadcrumbs_ties": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "della": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "della_linear": ({"weight": 0.8, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {}),
    "slerp": ({}, None, {"t": 0.4}),
}


def recipe(method: str, dtype: str = "float32", base: str = "base", experts: tuple[str, str] = ("expert_a", "expert_b")
           ) -> Recipe:
    a, b, g = RECIPES[method]
    models = [ModelParams(model=experts[0], parameters=a)]
    if b is not None:
        models.append(ModelParams(model=experts[1], parameters=b))
    return Recipe(method=method, base_model=base, models=tuple(models), parameters=g, seed=1, dtype=dtype)


def cpu_bandwidth() -> float:
    """Bytes per second of a 256 MB copy on this machine (read + write), the best of 5."""
    a = torch.ones(64 * 2**20)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_merge(sources: ResidentSources, r: Recipe, target, repeats: int, device: str) -> float:
    sources.merge_into(r, target)  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        sources.merge_into(r, target)
    sync(device)
    return (time.perf_counter() - t) / repeats


def cpu_table(repeats: int, skip_mergekit: bool, experiment: Path | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.architecture import for_model_dir

    if experiment is None:
        from evomerge.zoo import build_zoo

        zoo = build_zoo(kind="cross-skill", seed=0)
        dirs, base, dtype, what = {k: Path(v) for k, v in zoo.models.items()}, "base", "float32", "cross-skill zoo"
    else:
        from evomerge.config import load_experiment
        from evomerge.sources import resolve_model_dir
        from evomerge.wiring import resolve_worker_spec

        exp = load_experiment(experiment)
        spec = resolve_worker_spec(exp)
        base, dtype, what = exp.base_model, exp.dispatch.dtype, f"{exp.name}'s sources"
        others = [m.name for m in exp.models if m.name != base][:2]
        dirs = {n: resolve_model_dir(spec.model_dirs[n]) for n in (base, *others)}
    experts = tuple(n for n in dirs if n != base)
    experts = (experts[0], experts[-1])
    sources = ResidentSources.from_model_dirs(dirs, base, dtype=getattr(torch, dtype))
    model = AutoModelForCausalLM.from_pretrained(dirs[base], dtype=getattr(torch, dtype))
    target = model.state_dict()
    arch = for_model_dir(dirs[base])
    cli = Path(sys.executable).parent / "mergekit-yaml"
    numel = sum(t.numel() for t in sources._base.values())
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    bandwidth = cpu_bandwidth()
    print(f"(a) CPU, {what} ({numel / 1e6:.2f} M params per model, {dtype}, 3 sources), torch threads "
          f"{torch.get_num_threads()}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| method | evomerge s/candidate | bytes moved | floor s | x floor | mergekit-yaml s | vs mergekit |")
    print("|---|---|---|---|---|---|---|")
    for method in RECIPES:
        r = recipe(method, dtype, base, experts)
        ours = time_merge(sources, r, model, repeats, "cpu")
        n_read = 1 + (1 if method == "slerp" else 2)  # the base and the task vectors it uses
        moved = (n_read + 1) * numel * width
        floor = moved / bandwidth
        theirs = None
        if not skip_mergekit and cli.exists() and arch.mergekit:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "m.yml"
                cfg.write_text(mergekit_yaml(r, {k: str(v) for k, v in dirs.items()}, arch))
                t = time.perf_counter()
                subprocess.run([str(cli), str(cfg), str(Path(tmp) / "out"), "--random-seed", "1",
                                "--no-copy-tokenizer", "--quiet"], check=True, capture_output=True)
                theirs = time.perf_counter() - t
                shutil.rmtree(Path(tmp) / "out", ignore_errors=True)
        mk = f"{theirs:.2f}" if theirs else "n/a"
        ratio = f"{theirs / ours:,.0f}x" if theirs else "n/a"
        print(f"| {method} | {ours:.4f} | {moved / 1e9:.2f} GB | {floor:.4f} | {ours / floor:.1f}x | {mk} | {ratio} |")
    del target


def gpu_table(repeats: int) -> None:
    device = "cuda"
    dtype = torch.bfloat16
    h, inter, layers, vocab = 4096, 11008, 32, 32000
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    gen = torch.Generator(device=device).manual_seed(0)

    def weights(scale: float, base=None):
        return {k: (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * scale
                    + (0 if base is None else base[k].float())).to(dtype) for k, s in shapes.items()}

    base = weights(0.02)
    state = {"base": base, "expert_a": weights(0.002, base), "expert_b": weights(0.002, base)}
    sources = ResidentSources.from_state_dicts(state, "base", device=device, dtype=dtype)
    del state
    target = {k: torch.empty(s, device=device, dtype=dtype) for k, s in shapes.items()}
    numel = sum(t.numel() for t in target.values())
    # bandwidth: a device-to-device copy of a 2 GiB buffer (read + write)
    buf = torch.empty(2**30, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(buf)
    out.copy_(buf)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        out.copy_(buf)
    sync(device)
    bandwidth = 10 * 2 * buf.numel() * 2 / (time.perf_counter() - t)
    del buf, out
    print(f"\n(b) {torch.cuda.get_device_name()}: Llama-7B shapes ({numel / 1e9:.2f} B params), bf16, 3 sources; "
          f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| method | s/candidate | bytes moved | floor s | x floor |")
    print("|---|---|---|---|---|")
    for method in RECIPES:
        r = recipe(method, "bfloat16")
        n_read = 1 + (1 if method == "slerp" else 2)  # base + the deltas it uses
        moved = (n_read + 1) * numel * 2
        floor = moved / bandwidth
        s = time_merge(sources, r, target, repeats, device)
        print(f"| {method} | {s:.3f} | {moved / 1e9:.1f} GB | {floor:.3f} | {s / floor:.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--experiment", type=Path, help="measure this experiment's sources (default: the zoo)")
    args = ap.parse_args()
    if not args.gpu_only:
        cpu_table(args.repeats, args.skip_mergekit, args.experiment)
    if torch.cuda.is_available():
        gpu_table(args.repeats)
    else:
        print("\n(b) no CUDA device here: the 7B-shaped GPU figures need one (e.g. the project's device tool)")


if __name__ == "__main__":
    main()
