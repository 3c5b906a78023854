"""Parity with real mergekit 0.1.5 (installed by the `test` extra; skipped where it is absent).

Two levels:

- per tensor, through mergekit's public ``merge_tensors`` API, on random tensors in
  float32 and bfloat16: our method functions must give identical results, DARE
  included (``torch.manual_seed(s)`` for mergekit's global RNG vs a generator seeded
  ``s`` for ours);
- end to end: ``mergekit-yaml`` on three tiny saved Llama models, for a recipe
  translated to mergekit YAML (per-group values become ``filter`` lists). Non-random
  methods are compared with :class:`ResidentSources`; DARE is replayed with the pure
  functions on torch's global RNG seeded like ``--random-seed``, tensors in sorted name
  order (the order mergekit 0.1.5 executes them in), which reproduces it exactly. Our
  backend seeds DARE per tensor instead, so it matches mergekit only in distribution.

Max abs differences are printed (``pytest -s``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")
from mergekit.merge_methods import merge_tensors  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.merge.backend import ResidentSources  # noqa: E402
from evomerge.mergekit_config import mergekit_yaml  # noqa: E402
from evomerge.merge.methods.linear import linear  # noqa: E402
from evomerge.merge.parameter_space import merge_tensor  # noqa: E402
from evomerge.architecture import BY_NAME  # noqa: E402

LLAMA = BY_NAME["llama"]
from evomerge.recipe import ModelParams, Recipe  # noqa: E402

NUM_LAYERS = 2


def threshold_ties(deltas: list[torch.Tensor], densities: list[float]) -> torch.Tensor:
    """Entries tied (with another entry) at some delta's TIES keep threshold.

    mergekit keeps ``argsort(|delta|, descending=True)[:k]``; among entries *tied* at the
    k-th largest magnitude its choice is whatever the unstable CPU sort produced, while
    ours keeps the lowest indices. Only these entries may differ (a bf16 tensor has many
    such ties; random float32 ones have none).
    """
    out = torch.zeros(deltas[0].shape, dtype=torch.bool)
    for delta, density in zip(deltas, densities):
        magnitudes = delta.abs().float()
        k = max(1, int(density * magnitudes.numel()))
        at_kth = magnitudes == magnitudes.flatten().sort(descending=True).values[k - 1]
        if at_kth.sum() > 1:
            out |= at_kth
    return out


def compare(ours: torch.Tensor, theirs: torch.Tensor, tied: torch.Tensor | None) -> tuple[float, int, float]:
    """(max abs diff outside ``tied``, number of tied entries, max abs diff overall)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    diff = (ours.float() - theirs.float()).abs()
    tied = torch.zeros_like(diff, dtype=torch.bool) if tied is None else tied
    untied = diff[~tied]
    return (untied.max().item() if untied.numel() else 0.0), int(tied.sum()), diff.max().item()


def check(results: list[tuple[float, int, float]], label: str) -> None:
    """Print the max abs differences and require exact equality outside threshold ties."""
    untied = max(r[0] for r in results)
    tied = sum(r[1] for r in results)
    text = f"{untied:.3g}"
    if tied:
        text += f" outside {tied} entries tied at a TIES threshold ({max(r[2] for r in results):.3g} with them)"
    print(f"parity {label}: max abs diff {text}")
    assert untied == 0.0


def test_registry_matches_mergekits() -> None:
    """Every evomerge method has mergekit's parameters, with its defaults (required = no default)."""
    from mergekit import merge_methods

    from evomerge.merge.methods import METHODS

    for name, ours in METHODS.items():
        spec = merge_methods.get(name).spec
        theirs = {p.name: p for p in spec.parameters}
        mine = {**ours.model_parameters, **ours.global_parameters}
        assert set(mine) == set(theirs), name
        for pname, p in mine.items():
            their_default = theirs[pname].default
            if p.required:
                assert not isinstance(their_default, (bool, int, float)), f"{name}.{pname} has a default in mergekit"
            else:
                assert their_default == p.default, f"{name}.{pname}: {p.default} vs mergekit {their_default}"
            per_model = pname in ours.model_parameters
            assert per_model == (str(theirs[pname].scope).split(".")[-1] in ("NON_BASE", "INPUT")), f"{name}.{pname}"


# -- per tensor -----------------------------------------------------------------
TENSOR_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {}),
    ("ties", {"normalize": False, "rescale": True, "int8_mask": True, "lambda": 1.3}),
    ("dare_ties", {}),
    ("dare_ties", {"normalize": True, "rescale": False}),
    ("dare_linear", {}),
    ("dare_linear", {"normalize": True, "lambda": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("method", "global_params"), TENSOR_CASES)
def test_tensor_parity(method: str, global_params: dict, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 48).to(dtype)
    sources = [(base.float() + 0.05 * torch.randn(64, 48)).to(dtype) for _ in range(3)]
    weights, densities = [0.6, -0.3, 0.9], [0.3, 0.55, 0.8]
    ids = ["base", "x", "y", "z"]
    params = {"weight": dict(zip(ids[1:], weights)), **global_params}
    if method != "task_arithmetic":
        params["density"] = dict(zip(ids[1:], densities))
    torch.manual_seed(1234)
    theirs = merge_tensors([base, *sources], method, parameters=params, ids=ids, base_index=0)
    ours = merge_tensor(
        method,
        base,
        [s - base for s in sources],
        [{"weight": w, "density": d} for w, d in zip(weights, densities)],
        global_params,
        torch.Generator().manual_seed(1234),
    )
    tied = threshold_ties([s - base for s in sources], densities) if method == "ties" else None
    check([compare(ours, theirs, tied)], f"{method} {global_params} {dtype}")


def ties_in_magnitude(delta: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """Entries whose magnitude equals another entry's (in its row, with ``rows``): the only
    ones where a rank-based method may differ (mergekit ranks ties by an unstable sort)."""
    m = delta.abs().float()
    m = m.reshape(m.shape[0], -1) if rows and m.dim() > 1 else m.reshape(1, -1)
    out = torch.zeros_like(m, dtype=torch.bool)
    for r in range(m.shape[0]):
        values, counts = torch.unique(m[r], return_counts=True)
        out[r] = torch.isin(m[r], values[counts > 1])
    return out.reshape(delta.shape)


SPARSE_CASES = [
    ("breadcrumbs", {}, {"gamma": 0.05}),
    ("breadcrumbs", {"normalize": True, "rescale": True}, {"gamma": 0.0}),
    ("breadcrumbs_ties", {}, {"gamma": 0.02}),
    ("breadcrumbs_ties", {"normalize": True, "lambda": 0.8}, {"gamma": 0.1}),
    ("della", {}, {"epsilon": 0.1}),
    ("della", {"normalize": False, "rescale": False}, {"epsilon": 0.18}),
    ("della_linear", {}, {"epsilon": 0.15}),
    ("della_linear", {"normalize": True}, {"epsilon": 0.05}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("method", "global_params", "extra"), SPARSE_CASES)
def test_breadcrumbs_and_della_tensor_parity(method: str, global_params: dict, extra: dict, dtype) -> None:
    torch.manual_seed(0)
    base = torch.randn(64, 48).to(dtype)
    sources = [(base.float() + 0.05 * torch.randn(64, 48)).to(dtype) for _ in range(3)]
    weights, densities = [0.6, -0.3, 0.9], [0.3, 0.55, 0.8]
    ids = ["base", "x", "y", "z"]
    params = {"weight": dict(zip(ids[1:], weights)), "density": dict(zip(ids[1:], densities)), **global_params}
    params.update({k: dict.fromkeys(ids[1:], v) for k, v in extra.items()})
    torch.manual_seed(99)
    theirs = merge_tensors([base, *sources], method, parameters=params, ids=ids, base_index=0)
    ours = merge_tensor(method, base, [s - base for s in sources],
                        [{"weight": w, "density": d, **extra} for w, d in zip(weights, densities)],
                        global_params, torch.Generator().manual_seed(99))
    tied = None
    if dtype == torch.bfloat16:  # many equal magnitudes: ranks among them are the sort's choice
        tied = torch.zeros(base.shape, dtype=torch.bool)
        for src in sources:
            tied |= ties_in_magnitude(src - base, rows=method.startswith("della"))
    check([compare(ours, theirs, tied)], f"{method} {global_params} {extra} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 48), (48,), (8, 2, 3)], ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("collinear", [False, True])
def test_slerp_tensor_parity(t: float, shape: tuple, dtype, collinear: bool) -> None:
    torch.manual_seed(0)
    base = torch.randn(*shape).to(dtype)
    other = (base.float() * 2.5).to(dtype) if collinear else torch.randn(*shape).to(dtype)  # linear branch
    theirs = merge_tensors([base, other], "slerp", parameters={"t": t}, ids=["base", "x"], base_index=0)
    ours = merge_tensor("slerp", base, [other - base], [{}], {"t": t})
    # ours rebuilds `other` as base + (other - base): exact in float32 up to 1 ulp of the inputs
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"parity slerp t={t} {shape} {dtype}: max abs diff {diff:.3g}")
    assert diff <= tol * max(1.0, theirs.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(64, 48), (48,), (8, 2, 3)], ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_tensor_parity(n: int, filter_wise: bool, shape: tuple, dtype) -> None:
    torch.manual_seed(0)
    base = torch.randn(*shape).to(dtype)
    shared = 0.05 * torch.randn(*shape)  # fine-tunes that agree in part: 0 < cos < 1
    sources = [(base.float() + shared + 0.05 * torch.randn(*shape)).to(dtype) for _ in range(n)]
    ids = ["base", *"xyz"[:n]]
    theirs = merge_tensors([base, *sources], "model_stock", parameters={"filter_wise": filter_wise},
                           ids=ids, base_index=0)
    ours = merge_tensor("model_stock", base, [s - base for s in sources], [{}] * n, {"filter_wise": filter_wise})
    # ours rebuilds each model as base + (model - base): exact in float32 up to 1 ulp of the inputs
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    diff = (ours.float() - theirs.float()).abs().max().item()
    print(f"parity model_stock n={n} filter_wise={filter_wise} {shape} {dtype}: max abs diff {diff:.3g}")
    assert diff <= tol * max(1.0, theirs.float().abs().max().item())
    assert not torch.equal(ours, base) and not torch.equal(ours, sources[0])


def test_model_stock_keeps_the_base_where_the_ratio_is_singular() -> None:
    base = torch.zeros(4)
    up = torch.tensor([1.0, 0.0, 0.0, 0.0])
    merged = merge_tensor("model_stock", base, [up, -up], [{}, {}], {})  # opposite task vectors: cos -1, N = 2
    theirs = merge_tensors([base, base + up, base - up], "model_stock", parameters={}, ids=["b", "x", "y"],
                           base_index=0)
    assert torch.equal(merged, base) and torch.equal(theirs, base)
    with pytest.raises(ValueError, match="at least two fine-tuned models"):
        merge_tensor("model_stock", base, [up], [{}], {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_tensor_parity(normalize: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(64, 48).to(dtype) for _ in range(3)]
    weights = [0.6, -0.3, 0.9]
    theirs = merge_tensors(tensors, "linear", parameters={"weight": weights, "normalize": normalize})
    ours = linear(tensors, weights, normalize=normalize)
    check([compare(ours, theirs, None)], f"linear normalize={normalize} {dtype}")


# -- end to end: mergekit-yaml ------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    out = {}
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if name != "base":  # fine-tunes: the base plus a small perturbation
            torch.manual_seed(0)
            base = LlamaForCausalLM(config).state_dict()
            torch.manual_seed(seed)
            model.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()})
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def run_mergekit(recipe: Recipe, dirs: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    """mergekit-yaml on the YAML `evomerge export --format mergekit` writes for ``recipe``."""
    (out.parent / f"{out.name}.yml").write_text(mergekit_yaml(recipe, {k: str(v) for k, v in dirs.items()}, LLAMA))
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run(
        [str(cli), str(out.parent / f"{out.name}.yml"), str(out), "--random-seed", str(recipe.seed),
         "--no-copy-tokenizer", "--quiet"],
        check=True,
        capture_output=True,
    )
    return load_file(str(out / "model.safetensors"))


PER_GROUP_W = (0.2, 0.5, 0.9, 0.4)
PER_GROUP_D = (0.9, 0.3, 0.6, 0.5)
E2E = {
    "linear": ({"base": {"weight": 0.5}, "a": {"weight": PER_GROUP_W}, "b": {"weight": 0.3}}, {}),
    "task_arithmetic": ({"a": {"weight": PER_GROUP_W}, "b": {"weight": 0.3}}, {"lambda": 0.8}),
    "ties": ({"a": {"weight": PER_GROUP_W, "density": 0.5}, "b": {"weight": 0.3, "density": PER_GROUP_D}}, {}),
    "dare_ties": ({"a": {"weight": PER_GROUP_W, "density": 0.5}, "b": {"weight": 0.3, "density": PER_GROUP_D}}, {}),
    "dare_linear": (
        {"a": {"weight": 0.7, "density": PER_GROUP_D}, "b": {"weight": 0.3, "density": 0.4}},
        {"normalize": True},
    ),
    "breadcrumbs": ({"a": {"weight": PER_GROUP_W, "density": 0.6, "gamma": 0.05},
                     "b": {"weight": 0.3, "density": PER_GROUP_D}}, {}),
    "breadcrumbs_ties": ({"a": {"weight": 0.8, "density": PER_GROUP_D, "gamma": 0.02},
                          "b": {"weight": 0.5, "density": 0.7, "gamma": 0.1}}, {"normalize": True}),
    "della": ({"a": {"weight": PER_GROUP_W, "density": 0.5, "epsilon": 0.1},
               "b": {"weight": 0.3, "density": PER_GROUP_D, "epsilon": 0.05}}, {}),
    "della_linear": ({"a": {"weight": 0.7, "density": 0.4, "epsilon": 0.2},
                      "b": {"weight": 0.3, "density": PER_GROUP_D, "epsilon": 0.05}}, {}),
    "slerp": ({"a": {}}, {"t": 0.35}),
    "model_stock": ({"a": {}, "b": {}}, {"filter_wise": True}),
}


def make_recipe(method: str, dtype: str = "float32") -> Recipe:
    models, parameters = E2E[method]
    return Recipe(
        method=method,
        base_model="base",
        models=tuple(ModelParams(model=m, parameters=p) for m, p in models.items()),
        parameters=parameters,
        seed=42,
        dtype=dtype,
    )


@pytest.mark.parametrize(
    ("method", "dtype"),
    [("linear", "float32"), ("task_arithmetic", "float32"), ("ties", "float32"), ("ties", "bfloat16"),
     ("breadcrumbs", "float32"), ("breadcrumbs_ties", "float32"), ("slerp", "float32"), ("model_stock", "float32")],
)
def test_backend_matches_mergekit_yaml(method: str, dtype: str, dirs, tmp_path: Path) -> None:
    recipe = make_recipe(method, dtype)
    theirs = run_mergekit(recipe, dirs, tmp_path / "out")
    sources = ResidentSources.from_model_dirs(dirs, "base", dtype=getattr(torch, dtype))
    ours = sources.merged_state_dict(recipe)
    assert set(ours) == set(theirs)
    weights = {m: load_file(str(d / "model.safetensors")) for m, d in dirs.items()}
    results = []
    for key in sorted(ours):
        tied = None
        if method == "ties":
            g = LLAMA.tensor_group(key, NUM_LAYERS)
            base = weights["base"][key].to(ours[key].dtype)
            deltas = [weights[m.model][key].to(base.dtype) - base for m in recipe.models]
            tied = threshold_ties(deltas, [m.value("density", g) for m in recipe.models])
        results.append(compare(ours[key], theirs[key], tied))
    if method in ("slerp", "model_stock"):  # the models are rebuilt as base + (model - base): float32 rounding
        worst = max(r[2] for r in results)
        print(f"parity mergekit-yaml {method}: max abs diff {worst:.3g}")
        assert worst < 1e-5
        return
    check(results, f"mergekit-yaml {method} {dtype}")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_dare_replays_mergekit_yaml(method: str, dirs, tmp_path: Path) -> None:
    recipe = make_recipe(method)
    theirs = run_mergekit(recipe, dirs, tmp_path / "out")
    weights = {m: load_file(str(d / "model.safetensors")) for m, d in dirs.items()}
    torch.manual_seed(recipe.seed)
    results = []
    for key in sorted(theirs):
        g = LLAMA.tensor_group(key, NUM_LAYERS)
        base = weights["base"][key]
        ours = merge_tensor(
            method,
            base,
            [weights[m.model][key] - base for m in recipe.models],
            [{p: m.value(p, g) for p in m.parameters} for m in recipe.models],
            recipe.parameters,
        )
        results.append(compare(ours, theirs[key], None))
    check(results, f"mergekit-yaml {method} (global-RNG replay)")

    # our backend seeds each tensor on its own: same distribution, different draws
    backend = ResidentSources.from_model_dirs(dirs, "base").merged_state_dict(recipe)
    key = "model.layers.0.mlp.up_proj.weight"
    ours_kept = (backend[key] != weights["base"][key]).float().mean().item()
    theirs_kept = (theirs[key] != weights["base"][key]).float().mean().item()
    assert ours_kept == pytest.approx(theirs_kept, abs=0.05)


# -- gradients, filters and recipe-wide fallbacks: mergekit's own configs -------------------------
DEEP_LAYERS = 5  # gradients are read at t = 0, .25, .5, .75, 1: between a 3-point gradient's knots

MERGEKIT_CONFIGS = {
    # per-model gradients, filters whose values are gradients, a recipe-wide density for the
    # model that sets none
    "ties": """
merge_method: ties
base_model: base
dtype: float32
parameters: {normalize: true, density: 0.7}
models:
  - model: a
    parameters: {weight: [1.0, 0.2, 0.8]}
  - model: b
    parameters:
      weight: 0.6
      density: [{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.9, 0.1]}, {value: 0.5}]
""",
    # the classic SLERP config: t gradients per filter
    "slerp": """
merge_method: slerp
base_model: base
dtype: float32
models: [{model: base}, {model: a}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    # filters that match only some tensors: the rest fall through to the recipe-wide weight
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
dtype: float32
parameters: {weight: 0.25, lambda: [0.5, 1.5]}
models:
  - model: a
    parameters: {weight: [{filter: q_proj, value: 1.2}, {filter: down_proj, value: [0.0, 1.0]}]}
  - model: b
""",
    "linear": """
merge_method: linear
dtype: float32
models:
  - model: a
    parameters: {weight: [0.2, 1.0]}
  - model: b
    parameters: {weight: [{filter: embed_tokens, value: 0.9}, {value: [1.0, 0.1, 0.5, 0.3]}]}
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: base
dtype: float32
models:
  - model: a
    parameters: {weight: 0.8, density: [0.4, 0.9], gamma: [0.0, 0.1]}
  - model: b
    parameters: {weight: [0.3, 0.6], density: 0.7}
""",
}


@pytest.fixture(scope="module")
def deep_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity_deep")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=DEEP_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        base.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in
                              load_file(str(root / "base" / "model.safetensors")).items()}, strict=False)
        base.save_pretrained(root / name)
    return {n: root / n for n in ("base", "a", "b")}


def mergekit_yaml_run(config: Path, out: Path) -> dict[str, torch.Tensor]:
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], check=True,
                   capture_output=True, cwd=config.parent)  # mergekit reads relative model paths from the cwd
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", sorted(MERGEKIT_CONFIGS))
def test_mergekit_configs_with_gradients_and_filters(method: str, deep_dirs, tmp_path: Path) -> None:
    """The same mergekit config file through `mergekit-yaml` and `evomerge merge`: equal tensors."""
    from evomerge.cli import main

    config = tmp_path / "config.yml"
    text = MERGEKIT_CONFIGS[method]
    for name, path in deep_dirs.items():  # model names -> the fixture's dirs (relative to the config)
        (tmp_path / name).symlink_to(path)
    config.write_text(text)
    theirs = mergekit_yaml_run(config, tmp_path / "mergekit_out")
    assert main(["merge", str(config), "--out", str(tmp_path / "ours")]) == 0
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs)
    results = [compare(ours[k], theirs[k], None) for k in sorted(ours)]
    if method in ("slerp", "linear"):  # sources rebuilt as base + (source - base): within float32 rounding
        worst = max(r[2] for r in results)
        print(f"parity mergekit config {method}: max abs diff {worst:.3g}")
        assert worst < 1e-6
    else:
        check(results, f"mergekit config {method} (gradients, filters)")
    # the values really vary over layers: the merge is not one of the constant-parameter ones
    recipe = Recipe.load(tmp_path / "ours" / "evomerge_recipe.yaml")
    assert recipe.method == method and "gradient" in (tmp_path / "ours" / "evomerge_recipe.yaml").read_text()


def test_exported_gradients_and_filters_run_in_mergekit(deep_dirs, tmp_path: Path) -> None:
    """A recipe with per-group values, gradients, filters and a recipe-wide fallback, exported
    with `mergekit_yaml`, merges in mergekit to our backend's tensors."""
    from evomerge.recipe import Conditional, Gradient

    groups = DEEP_LAYERS + 2
    recipe = Recipe(
        method="ties", base_model="base", dtype="float32",
        models=(
            ModelParams(model="a", parameters={
                "weight": Gradient(gradient=(1.0, 0.3, 0.9)),
                "density": tuple(0.3 + 0.1 * g for g in range(groups))}),
            ModelParams(model="b", parameters={
                "weight": (Conditional(filter="self_attn", value=Gradient(gradient=(0.2, 0.8))),
                           Conditional(filter="mlp", value=0.4))}),
        ),
        parameters={"weight": 0.7, "density": 0.6, "lambda": Gradient(gradient=(0.8, 1.2))},
    )
    config = tmp_path / "exported.yml"
    config.write_text(mergekit_yaml(recipe, {k: str(v) for k, v in deep_dirs.items()}, LLAMA))
    theirs = mergekit_yaml_run(config, tmp_path / "out")
    ours = ResidentSources.from_model_dirs(deep_dirs, "base").merged_state_dict(recipe)
    check([compare(ours[k], theirs[k], None) for k in sorted(ours)], "exported gradients/filters")
    # and reading mergekit's config back gives the same merge
    from evomerge.mergekit_config import from_mergekit
    import yaml

    again, dirs = from_mergekit(yaml.safe_load(config.read_text()))
    assert dirs == {k: str(v.resolve()) for k, v in deep_dirs.items()}
    back = ResidentSources.from_model_dirs(deep_dirs, "base").merged_state_dict(again)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
