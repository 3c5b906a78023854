"""Published fixed layer-wise merges as recipes: Layer Swapping, LiNeS and Model Stock.

Each preset is a function of a few settings that returns an ordinary :class:`~evomerge.recipe.Recipe`
(hashable, exportable to mergekit YAML, materialised by ``evomerge merge --preset``):

- ``layer_swapping`` (Bandarkar et al., 2024, "Layer Swapping for Zero-Shot Cross-Lingual
  Transfer"): the ``k`` bottom and ``k`` top blocks, and the embeddings and the head, from the
  ``outer`` expert (the language expert), every other block from the ``inner`` one (the task
  expert): a linear merge with per-group weights 1 and 0, so each group is one expert's tensors
  (up to float32 rounding: resident sources are held as base + task vector). The paper chooses ``k`` on held-out data; the quality benchmark chooses it on the
  search split.
- ``lines`` (Wang et al., 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
  Enhances Model Merging"): task arithmetic where every expert's task vector is scaled linearly
  with depth, ``alpha`` at the bottom (the embeddings) to ``beta`` at the top (the head):
  group g of G gets ``alpha + (beta - alpha) · g / (G - 1)``.
- ``model_stock`` (Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned
  models"): mergekit's ``model_stock`` over every expert (at least two), the interpolation
  ratio from the angle between their task vectors, per tensor (or per row, ``filter_wise``).

A preset is written ``NAME`` or ``NAME:key=value,key=value`` (e.g. ``lines:alpha=0.2,beta=1``,
``layer_swapping:outer=expert_b,inner=expert_a,k=1``); the experts are an experiment's
non-base models, in order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from evomerge.errors import ConfigError
from evomerge.recipe import ModelParams, Recipe


def layer_swapping(experts: Sequence[str], base_model: str, num_layers: int, *, outer: str | None = None,
                   inner: str | None = None, k: int = 1) -> Recipe:
    """The outer ``k`` blocks at each end (and embeddings and head) from ``outer``, the rest from
    ``inner`` (defaults: the last expert outer, the first inner)."""
    outer = outer or experts[-1]
    inner = inner or experts[0]
    problems = [f"{name}: {value!r} is not one of the experts {list(experts)}"
                for name, value in (("outer", outer), ("inner", inner)) if value not in experts]
    if outer == inner:
        problems.append("outer and inner must be two different experts")
    k = int(k)
    if not 0 <= 2 * k <= num_layers:
        problems.append(f"k: {k} outer blocks at each end of {num_layers} blocks (0 <= 2k <= {num_layers})")
    if problems:
        raise ConfigError([f"preset layer_swapping: {p}" for p in problems])
    # groups: embed, block 0 .. block L-1, head
    from_outer = tuple(1.0 if g == 0 or g == num_layers + 1 or g - 1 < k or g - 1 >= num_layers - k else 0.0
                       for g in range(num_layers + 2))
    from_inner = tuple(1.0 - w for w in from_outer)
    return Recipe(method="linear", base_model=base_model, parameters={"normalize": False},
                  models=(ModelParams(model=outer, parameters={"weight": from_outer}),
                          ModelParams(model=inner, parameters={"weight": from_inner})))


def lines(experts: Sequence[str], base_model: str, num_layers: int, *, alpha: float = 0.5,
          beta: float = 1.0) -> Recipe:
    """Task arithmetic, every task vector scaled from ``alpha`` (embeddings) to ``beta`` (head)."""
    groups = num_layers + 2
    scale = tuple(round(float(alpha) + (float(beta) - float(alpha)) * g / (groups - 1), 12) for g in range(groups))
    return Recipe(method="task_arithmetic", base_model=base_model,
                  models=tuple(ModelParams(model=m, parameters={"weight": scale}) for m in experts))


def model_stock(experts: Sequence[str], base_model: str, num_layers: int, *, filter_wise: bool = False) -> Recipe:
    """mergekit's Model Stock over every expert."""
    if len(experts) < 2:
        raise ConfigError([f"preset model_stock: needs at least two experts besides the base, got {list(experts)}"])
    flag = filter_wise if isinstance(filter_wise, bool) else str(filter_wise).lower() in ("1", "true", "yes")
    return Recipe(method="model_stock", base_model=base_model, parameters={"filter_wise": flag},
                  models=tuple(ModelParams(model=m, parameters={}) for m in experts))


PRESETS: dict[str, Callable[..., Recipe]] = {"layer_swapping": layer_swapping, "lines": lines,
                                             "model_stock": model_stock}
_NUMBERS = {"k": int, "alpha": float, "beta": float}


def parse_preset(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,...`` -> (name, settings); ConfigError names what is wrong."""
    name, _, rest = text.partition(":")
    if name not in PRESETS:
        raise ConfigError([f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}"])
    settings: dict[str, Any] = {}
    problems = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--preset {name}: expected key=value, got {item!r}")
            continue
        try:
            settings[key] = _NUMBERS[key](value) if key in _NUMBERS else value
        except ValueError:
            problems.append(f"--preset {name}: {key} must be a number, got {value!r}")
    if problems:
        raise ConfigError(problems)
    return name, settings


def preset_recipe(text: str, experts: Sequence[str], base_model: str, num_layers: int) -> Recipe:
    """The recipe a preset spec (``NAME[:key=value,...]``) makes for these experts."""
    name, settings = parse_preset(text)
    import inspect

    known = [p for p in inspect.signature(PRESETS[name]).parameters if p not in ("experts", "base_model", "num_layers")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError([f"--preset {name}: unknown setting(s) {unknown}; it takes {known}"])
    return PRESETS[name](list(experts), base_model, num_layers, **settings)
