"""LoRA adapters trained on the zoo's skills, saved as PEFT adapters (the adapter zoo's sources).

Each adapter is trained from the zoo's base with the base frozen: a low-rank delta
``(B @ A) * alpha / r`` on the targeted weights (torch parametrizations; no PEFT needed to train
or to merge), then written as PEFT writes a LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's key names), so PEFT loads it (``tests/test_adapters.py``).
Initialisation is PEFT's: ``A`` Kaiming-uniform and ``B`` zero for linear layers, ``A`` zero and
``B`` normal for embeddings.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaForCausalLM

from evomerge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from evomerge.zoo.train import Progress, SequenceMaker, StageConfig, run_steps

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_NAME = "zoo:base"
"""What the adapters' ``base_model_name_or_path`` says: the zoo's base, whichever directory holds it."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the zoo: what it trains on, its rank and which modules it adapts.

    ``data``: ``arith`` (L1 solved problems, loss on answers, with probability ``problem_fraction``,
    else L1 text) or ``text`` (``l2_fraction`` of sentences in L2; ``wrong_facts`` of them state a
    wrong single-digit result)."""

    name: str
    data: str
    rank: int = 8
    alpha: float = 16.0
    steps: int = 300
    lr: float = 2e-3
    l2_fraction: float = 0.0
    problem_fraction: float = 0.7
    wrong_facts: float = 0.0
    targets: tuple[str, ...] = BLOCK_LINEARS


class LoRADelta(nn.Module):
    """``W + T(B @ A) * scaling`` as a parametrization of a weight (``T`` for embeddings)."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, embedding: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape
        out, inp = (cols, rows) if embedding else (rows, cols)
        self.embedding = embedding
        self.scaling = scaling
        if embedding:
            self.A = nn.Parameter(torch.zeros(rank, inp))
            self.B = nn.Parameter(torch.randn(out, rank, generator=generator))
        else:
            bound = 1 / math.sqrt(inp)  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] matrix
            self.A = nn.Parameter(torch.empty(rank, inp).uniform_(-bound, bound, generator=generator))
            self.B = nn.Parameter(torch.zeros(out, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.B @ self.A
        return weight + (delta.T if self.embedding else delta) * self.scaling


def _targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    found = {path: module for path, module in model.named_modules()
             if path.rsplit(".", 1)[-1] in names and isinstance(module, (nn.Linear, nn.Embedding))}
    missing = sorted(set(names) - {path.rsplit(".", 1)[-1] for path in found})
    if missing:
        raise ValueError(f"the model has no module named {missing}")
    return found


def train_adapter(base: LlamaForCausalLM, spec: AdapterSpec, make: SequenceMaker, rng: random.Random,
                  seed: int, token_ids: dict[str, int], bos_id: int, progress: Progress,
                  warmup: int = 50) -> tuple[LlamaForCausalLM, dict[str, LoRADelta], float, float]:
    """A copy of ``base`` with ``spec``'s adapter trained on sequences from ``make``: (the adapted
    model, its LoRA parametrizations by module path, the smoothed final loss, seconds)."""
    model = copy.deepcopy(base)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    deltas: dict[str, LoRADelta] = {}
    for path, module in _targets(model, spec.targets).items():
        delta = LoRADelta(module.weight, spec.rank, spec.alpha / spec.rank, isinstance(module, nn.Embedding),
                          generator)
        parametrize.register_parametrization(module, "weight", delta)
        deltas[path] = delta
    trainable = [p for d in deltas.values() for p in (d.A, d.B)]
    config = StageConfig(spec.steps, body_lr=spec.lr, warmup=warmup)
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    result = run_steps(f"adapter {spec.name}", model, optimizer, trainable, config, make, rng, token_ids, bos_id,
                       progress)
    return model, deltas, result.loss_ema, result.seconds


def save_adapter(deltas: dict[str, LoRADelta], spec: AdapterSpec, directory: Path) -> Path:
    """Write the adapter as PEFT saves a LoRA adapter (its key names and config)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, delta in deltas.items():
        key = f"base_model.model.{path}"
        if delta.embedding:
            tensors[f"{key}.lora_embedding_A"] = delta.A.detach().contiguous()
            tensors[f"{key}.lora_embedding_B"] = delta.B.detach().contiguous()
        else:
            tensors[f"{key}.lora_A.weight"] = delta.A.detach().contiguous()
            tensors[f"{key}.lora_B.weight"] = delta.B.detach().contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "target_modules": sorted(spec.targets), "base_model_name_or_path": BASE_NAME, "bias": "none",
              "fan_in_fan_out": False, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
              "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": {}, "alpha_pattern": {}}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory
