"""Fitness throughput: what one evaluation costs per request kind, through lm-eval's ``HFLM``,
through evomerge's backend, and as a bare forward pass over the same tokens.

A worker scores a task through lm-eval on its in-memory model, as in a search. For each request
kind — multiple choice zero-shot and 5-shot (the zoo's search task, 300 items x 4 choices) and
generation (its generate_until variant) — this prints, in one run on one model: the seconds
per evaluation and the tokens fed to the model (counted at its forward, padding included) with
``HFLM`` (``suite.backend: hf``) and with the evomerge backend (the default: each shared context
runs once, continuations are scored from its KV cache), and both scores (they must be equal).
The same (context, continuation) pairs also run as bare forward passes (sorted by length,
padded per batch of ``--batch-size``): the floor of HFLM's approach; for generation, each
prompt with its gold answer in one pass (the floor of any decoder: no step-by-step decoding).

Targets on 2 CPU threads (issue: fitness cost): 5-shot multiple choice >= 2x faster than
``HFLM``; zero-shot never slower.

- CPU (default): the cross-skill zoo's expert_a.
- ``--shape 1b --device cuda``: a randomly initialised ~1B Llama-shaped model (hidden 2048,
  16 layers, GQA 32/8, the zoo's tokenizer) in bf16 on the GPU, same tasks, built in memory.

``--generate``: greedy generation per decoder instead (batch ``--batch-size``, ``--new-tokens``
new tokens, prompts: the search task's questions; no stop string when ``--new-tokens`` is
given, so every decoder generates the same number of tokens): lm-eval's ``HFLM`` and the
evomerge backend with each decoder (``generate``, continuous batching, static cache, and
``auto``'s pick), each checked against ``HFLM``'s texts.

- ``--experiment EXP``: your own setup instead of the zoo: the experiment's base model (or
  ``--source NAME``), its task dirs, and its search tasks (or ``--tasks a,b``), in its dtype;
  each task 0-shot (and ``--fewshot N``-shot for multiple choice).

Usage: python benchmarks/fitness_throughput.py [--experiment EXP.yaml [--source NAME] [--tasks a,b] [--fewshot N]]
       [--device cpu|cuda] [--shape zoo|1b] [--batch-size 64] [--repeats 3]
       [--threads N] [--items N]   (a smoke run on the first N items)
       [--generate [--new-tokens N] [--prompts N]]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import load_experiment  # noqa: E402
from evomerge.evaluate.lm_eval_runner import LmEvalEvaluator  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402


TASK = "zoo_arith_l2_search"
KINDS = [  # (request kind, task, few-shot examples)
    ("multiple choice, 0-shot", TASK, None),
    ("multiple choice, 5-shot", TASK, 5),
    ("generation (greedy, <= 8 tokens)", "zoo_arith_l2_gen_search", None),
]


def requests_of(evaluator: LmEvalEvaluator) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for the search split."""
    _, task_dict, _ = evaluator._splits["search"]
    pairs = []
    limit = evaluator.suite.tasks[0].limit
    for task in task_dict.values():
        task.build_all_requests(rank=0, world_size=1, limit=limit)
        for inst in task.instances:
            if inst.request_type == "generate_until":  # the prompt and its gold answer, as one sequence
                answer = task.doc_to_target(inst.doc)
                choices = task.doc_to_choice(inst.doc) if task.config.doc_to_choice is not None else None
                answer = choices[answer] if choices is not None and isinstance(answer, int) else answer
                pairs.append((inst.arguments[0], " " + str(answer)))
            else:
                pairs.append(inst.arguments)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["zoo", "1b"], default="zoo")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    ap.add_argument("--items", type=int, default=None, help="score only the first N items (a smoke run)")
    ap.add_argument("--generate", action="store_true", help="time greedy generation per decoder instead")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens to generate per prompt (default: up to the answer's stop string, at most 8)")
    ap.add_argument("--prompts", type=int, default=128, help="prompts to generate from (--generate)")
    ap.add_argument("--experiment", type=Path, help="measure this experiment's model and tasks (default: the zoo)")
    ap.add_argument("--source", help="with --experiment: the source to score (default: its base model)")
    ap.add_argument("--tasks", help="with --experiment: comma-separated task names (default: its search tasks)")
    ap.add_argument("--fewshot", type=int, default=None, help="with --experiment: also N-shot multiple choice")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.experiment is not None:
        from evomerge.sources import resolve_model_dir
        from evomerge.wiring import resolve_worker_spec

        exp = load_experiment(args.experiment)
        spec = resolve_worker_spec(exp)
        model_dir = resolve_model_dir(spec.model_dirs[args.source or exp.base_model])
        task_paths = [str(p) for p in spec.task_paths]
        wanted = args.tasks.split(",") if args.tasks else [t.name for t in exp.suite.tasks]
        specs = {t.name: t for t in (*exp.suite.tasks, *exp.suite.validation_tasks, *exp.suite.test_tasks)}
        kinds = []
        for name in wanted:
            spec_t = specs.get(name) or exp.suite.tasks[0].model_copy(update={"name": name})
            kinds.append((f"{name}, 0-shot", spec_t, None))
            if args.fewshot:
                kinds.append((f"{name}, {args.fewshot}-shot", spec_t, args.fewshot))
        dtype = getattr(torch, exp.dispatch.dtype)
    else:
        exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
        zoo = build_zoo(kind=exp.zoo.kind, seed=exp.zoo.seed)
        model_dir = zoo.models["expert_a"]
        task_paths = [str(zoo.tasks_dir)]
        kinds = [(kind, exp.suite.tasks[0].model_copy(update={
            "name": task, "metric": "exact_match" if "_gen_" in task else "acc"}), fewshot)
            for kind, task, fewshot in KINDS]
        dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_label = args.shape if args.experiment is None or args.shape != "zoo" else f"{Path(model_dir).name} of {exp.name}"
    if args.shape == "zoo":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        dtype = torch.bfloat16
        base = LlamaConfig.from_pretrained(model_dir)
        cfg = LlamaConfig(vocab_size=base.vocab_size, hidden_size=2048, intermediate_size=8192,
                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=base.max_position_embeddings,
                          bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                          pad_token_id=base.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(args.device).eval()
    params = sum(p.numel() for p in model.parameters())

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def evaluators_for(task, fewshot):
        spec = task.model_copy(update={"limit": args.items or task.limit, "num_fewshot": fewshot})
        suite = exp.suite.model_copy(update={"batch_size": args.batch_size, "test_tasks": (), "tasks": (spec,),
                                             "validation_tasks": (), "racing": None})
        return {backend: LmEvalEvaluator(model, tokenizer, suite.model_copy(update={"backend": backend}),
                                         task_paths, device=args.device)
                for backend in ("evomerge", "hf")}

    if args.generate:
        return generation(args, model, tokenizer, evaluators_for(kinds[0][1], None)["hf"], params, dtype)

    print(f"model: {model_label} ({params / 1e6:.1f} M params, {dtype}), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}, {args.repeats} repeats")
    print("| request kind | path | seconds per evaluation | tokens fed to the model | vs HFLM | score |")
    print("|---|---|---|---|---|---|")
    for kind, task, fewshot in kinds:
        evaluators = evaluators_for(task, fewshot)
        timed, fed, scores = {}, {}, {}
        for backend, ev in evaluators.items():
            scores[backend] = next(iter(ev.evaluate("search").values()))  # warm-up (and tokenization memo)
            counted = []
            hook = model.register_forward_pre_hook(
                lambda _m, a, kw: counted.append((kw.get("input_ids", a[0] if a else None)).numel()), with_kwargs=True)
            try:
                ev.evaluate("search")
            finally:
                hook.remove()
            fed[backend] = sum(counted)
            sync()
            t = time.perf_counter()
            for _ in range(args.repeats):
                ev.evaluate("search")
            sync()
            timed[backend] = (time.perf_counter() - t) / args.repeats
        rows = [("lm-eval `HFLM`", "hf"), ("evomerge backend", "evomerge")]
        bare_s, bare_tokens = bare_forward(args, model, tokenizer, requests_of(evaluators["hf"]), sync)
        what = "prompt + gold answer, one pass" if "_gen_" in task.name else "context + continuation"
        print(f"| {kind} | bare forward ({what}, sorted, padded) | {bare_s:.3f} | "
              f"{bare_tokens:,} | {timed['hf'] / bare_s:.2f}x | |")
        for label, backend in rows:
            print(f"| {kind} | {label} | {timed[backend]:.3f} | {fed[backend]:,} | "
                  f"{timed['hf'] / timed[backend]:.2f}x | {scores[backend]:.4f} |")
        if scores["hf"] != scores["evomerge"]:
            print(f"WARNING: {kind}: the scores differ ({scores})")


def bare_forward(args, model, tokenizer, pairs, sync) -> tuple[float, int]:
    """Seconds per pass and tokens (with padding) of the requests as bare padded forward passes."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [bos + tokenizer(c, add_special_tokens=False).input_ids + tokenizer(x, add_special_tokens=False).input_ids
            for c, x in pairs]
    ordered = sorted(seqs, key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, padded = [], 0
    for i in range(0, len(ordered), args.batch_size):
        chunk = ordered[i:i + args.batch_size]
        width = len(chunk[0])
        padded += width * len(chunk)
        batches.append(torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=args.device))
    with torch.inference_mode():
        for b in batches:
            model(b)  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(args.repeats):
            for b in batches:
                model(b)
        sync()
    return (time.perf_counter() - t) / args.repeats, padded


def generation(args, model, tokenizer, evaluator, params, dtype) -> None:
    """Greedy generation through lm-eval's HFLM and the evomerge backend's decoders."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate.lm_eval_runner import evomerge_lm_class

    questions = [q for q, _ in requests_of(evaluator)][:: 4][: args.prompts]  # one per item (4 choices each)
    kwargs = {"do_sample": False, "max_gen_toks": args.new_tokens or 8, "until": [] if args.new_tokens else ["!"]}

    def instances():
        return [Instance(request_type="generate_until", doc={}, arguments=(q, dict(kwargs)), idx=0) for q in questions]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    common = dict(pretrained=model, tokenizer=tokenizer, device=args.device, batch_size=args.batch_size,
                  max_length=max(64, args.new_tokens + 64 if args.new_tokens else 64))
    paths = [("lm-eval HFLM (generate)", HFLM(**common))]
    for decoder in ("hf", "static", "continuous", "auto"):
        paths.append((f"evomerge backend, `generation: {decoder}`", evomerge_lm_class()(**common, generation=decoder)))
    print(f"model: {args.shape} ({params / 1e6:.1f} M params, {dtype}), device {args.device}, "
          f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}, {len(questions)} prompts, "
          f"{kwargs['max_gen_toks']} new tokens at most" + ("" if args.new_tokens else ", stop at '!'"))
    print("| path | seconds | prompts/s | texts equal to HFLM's |")
    print("|---|---|---|---|")
    reference = None
    for label, lm in paths:
        try:
            lm.generate_until(instances(), disable_tqdm=True)  # warm-up (and auto's measurement)
            sync()
            start = time.perf_counter()
            for _ in range(args.repeats):
                texts = lm.generate_until(instances(), disable_tqdm=True)
            sync()
        except Exception as error:  # a decoder this model or device does not support
            print(f"| {label} | failed: {type(error).__name__}: {str(error)[:80]} | | |")
            continue
        sec = (time.perf_counter() - start) / args.repeats
        reference = reference if reference is not None else texts
        same = sum(a == b for a, b in zip(texts, reference))
        print(f"| {label} | {sec:.3f} | {len(questions) / sec:,.1f} | {same}/{len(texts)} |")
        decoders = getattr(lm, "decoders", None)
        if decoders is not None and decoders.setting == "auto":
            print(f"auto chose {decoders.chosen}" + (f"; measured {decoders.measured}" if decoders.measured else
                                                     " (CPU: generate, not measured)"))


if __name__ == "__main__":
    main()
