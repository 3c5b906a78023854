"""The evomerge lm-eval backend: shared contexts scored once, results equal to lm-eval's HFLM.

Each family's tiny random model (transformers' own config classes) and a data-flow shell with
a repeated layer are scored by both backends on the same token requests: contexts of 2-20
tokens, each with 1-4 continuations of 1-5 tokens, some truncated from the left by a 16-token
window. Log-likelihoods agree within 1e-4 and greedy flags exactly, while the evomerge
backend feeds the model fewer tokens and scores continuations from a KV cache (so it really
took its own path).
"""

from __future__ import annotations

from pathlib import Path

import random

import pytest
import torch
import transformers as T

from evomerge.config import SuiteConfig
from evomerge.evaluate import shared_context
from evomerge.evaluate.lm_eval_runner import LmEvalEvaluator, evomerge_lm_class

_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
FAMILIES = {
    "llama": (T.LlamaConfig, _ATTN),
    "qwen3": (T.Qwen3Config, _ATTN),
    "gemma2": (T.Gemma2Config, {**_ATTN, "sliding_window": 8}),  # contexts longer than the window
    "gemma3_text": (T.Gemma3TextConfig, {**_ATTN, "sliding_window": 8}),
    "phi3": (T.Phi3Config, _ATTN),
    "gpt_neox": (T.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4)),
    "gpt2": (T.GPT2Config, dict(n_embd=64, n_layer=3, n_head=4, n_positions=64)),
}


@pytest.fixture(scope="module")
def tokenizer(session_tiny_zoo):
    return T.AutoTokenizer.from_pretrained(session_tiny_zoo.models["base"])


def _requests(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for n in range(14):
        context = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))]
        for _ in range(rng.randint(1, 4)):
            continuation = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 5))]
            out.append(((f"c{n}", f"x{len(out)}"), context, continuation))
    rng.shuffle(out)
    return out


def _calls(model, run):
    """``run()``'s result and, per forward call of ``model``, (tokens fed, whether a KV cache was passed)."""
    calls = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((ids.numel(), any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return result, calls


def _compare(model, tokenizer, batch_size=8):
    from lm_eval.models.huggingface import HFLM

    requests = _requests(model.config.vocab_size)
    kw = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size, max_length=16)
    ref, ref_calls = _calls(model, lambda: HFLM(**kw)._loglikelihood_tokens(requests, disable_tqdm=True))
    got, got_calls = _calls(model, lambda: evomerge_lm_class()(**kw)._loglikelihood_tokens(
        requests, disable_tqdm=True))
    assert len(got) == len(ref)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-4
    assert [a[1] for a in got] == [b[1] for b in ref]
    # its own path: continuations scored from a context's KV cache, fewer tokens fed than HFLM
    assert any(cached for _, cached in got_calls) and not any(cached for _, cached in ref_calls)
    assert sum(n for n, _ in got_calls) < sum(n for n, _ in ref_calls)
    return got


def _random_model(family: str, tokenizer):
    """A tiny random model of ``family`` with the tiny zoo's vocabulary (seeded)."""
    config_class, kwargs = FAMILIES[family]
    cfg = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_context_scores_equal_hflm_for_every_family(family, tokenizer):
    model = _random_model(family, tokenizer)
    assert shared_context.cache_argument(model) is not None
    got = _compare(model, tokenizer)
    assert all(ll < 0 for ll, _ in got)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_a_few_shot_prefix_shared_by_every_context_runs_once(family, tokenizer):
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate.shared_context import MIN_SHARED_PREFIX

    model = _random_model(family, tokenizer)
    vocab = model.config.vocab_size
    rng = random.Random(1)
    prefix = [rng.randrange(3, vocab) for _ in range(MIN_SHARED_PREFIX + 4)]
    requests = []
    for n in range(6):
        context = prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
        for _ in range(4):
            requests.append(((f"c{n}", str(len(requests))), context,
                             [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))]))
    kw = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=64)
    ref = HFLM(**kw)._loglikelihood_tokens(requests, disable_tqdm=True)
    got, calls = _calls(model, lambda: evomerge_lm_class()(**kw)._loglikelihood_tokens(requests, disable_tqdm=True))
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-4
    assert [a[1] for a in got] == [b[1] for b in ref]
    # the prefix alone first (one row), then the contexts' own tokens, then the continuations;
    # gemma2's 8-token window is shorter than the sequences, so there the prefix is not shared
    assert (calls[0][0] == len(prefix)) == (family != "gemma2"), calls


def test_a_data_flow_shell_with_a_repeated_layer_scores_like_hflm(session_tiny_zoo, tokenizer):
    from evomerge.merge.dataflow import DataFlowModel, load_donors
    from evomerge.recipe import DFSRecipe, PathStep

    dirs = {k: str(v) for k, v in session_tiny_zoo.models.items()}
    shell = T.AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    dfm = DataFlowModel(load_donors(dirs), shell)
    recipe = DFSRecipe(embed_from="base", layers=(
        PathStep(model="base", layer=0), PathStep(model="expert_a", layer=1, scale=0.9),
        PathStep(model="expert_a", layer=1), PathStep(model="expert_b", layer=0, scale=1.1)))
    _compare(dfm.assemble(recipe).eval(), tokenizer)


def test_one_context_with_more_continuations_than_the_batch_runs_whole(tokenizer, session_tiny_zoo):
    model = T.AutoModelForCausalLM.from_pretrained(session_tiny_zoo.models["base"]).eval()
    requests = [((None, None), [5, 6, 7], [8 + i, 9]) for i in range(10)]
    kw = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    from lm_eval.models.huggingface import HFLM

    ref = HFLM(**kw)._loglikelihood_tokens(requests, disable_tqdm=True)
    got = evomerge_lm_class()(**kw)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-4


def test_the_suite_backends_give_the_same_scores_and_hf_is_lm_evals_own(session_tiny_zoo, tokenizer):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    model = T.AutoModelForCausalLM.from_pretrained(session_tiny_zoo.models["expert_a"]).eval()
    base = dict(tasks=[{"name": "zoo_arith_l2_search", "metric": "acc"}],
                test_tasks=[{"name": "zoo_arith_l2_test", "metric": "acc"}], batch_size=32)
    assert SuiteConfig(**base).backend == "evomerge"
    # the backend does not change a score, so it does not change the suite's hash (caches stay valid)
    assert SuiteConfig(**base).content_hash() == SuiteConfig(**base, backend="hf").content_hash()
    paths = [str(session_tiny_zoo.tasks_dir)]
    ours = LmEvalEvaluator(model, tokenizer, SuiteConfig(**base), paths)
    theirs = LmEvalEvaluator(model, tokenizer, SuiteConfig(**base, backend="hf"), paths)
    assert type(theirs._lm) is HFLM and type(ours._lm) is evomerge_lm_class()
    assert get_model("evomerge") is evomerge_lm_class()  # registered with lm-eval
    for split in ("search", "test"):
        assert ours.evaluate(split) == theirs.evaluate(split)
        assert ours.evaluate(split) == theirs.evaluate(split)  # again, with the memoized tokenization
    # 5-shot: lm-eval's few-shot sampler is re-seeded per evaluation (as simple_evaluate does), so
    # every candidate sees the same prompts; without it the second evaluation drew new examples
    shot = dict(base, tasks=[{"name": "zoo_arith_l2_search", "metric": "acc", "num_fewshot": 5}], test_tasks=[])
    ours = LmEvalEvaluator(model, tokenizer, SuiteConfig(**shot), paths)
    theirs = LmEvalEvaluator(model, tokenizer, SuiteConfig(**shot, backend="hf"), paths)
    first = theirs.score("search")[1]
    assert theirs.score("search")[1] == first == ours.score("search")[1] == ours.score("search")[1]
    # the zoo's generation tasks (exact match of generated digits) through both backends
    gen = dict(tasks=[{"name": "zoo_arith_l1_gen_search", "metric": "exact_match"}],
               test_tasks=[{"name": "zoo_arith_l2_gen_test", "metric": "exact_match"}], batch_size=16)
    ours = LmEvalEvaluator(model, tokenizer, SuiteConfig(**gen), paths)
    theirs = LmEvalEvaluator(model, tokenizer, SuiteConfig(**gen, backend="hf"), paths)
    for split in ("search", "test"):
        assert ours.evaluate(split) == theirs.evaluate(split)


def test_an_unknown_backend_is_named():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="backend"):
        SuiteConfig(tasks=[{"name": "t", "metric": "acc"}], backend="vllm")


def _generation_requests(n: int = 6):
    from lm_eval.api.instance import Instance

    prompts = ["3 4 plus 1 2 =", "5 1 minus 2 7 =", "9 9 plus 9 9 =", "1 0 minus 1 =", "4 4 plus", "7 ="][:n]
    return [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(p, {"until": ["!", "."], "max_gen_toks": 6, "do_sample": False})) for p in prompts]


@pytest.mark.parametrize("decoder", ["hf", "static", "continuous"])
def test_every_decoder_generates_hflms_greedy_texts(decoder, session_tiny_zoo, tokenizer):
    from lm_eval.models.huggingface import HFLM

    model = T.AutoModelForCausalLM.from_pretrained(session_tiny_zoo.models["expert_a"]).eval()
    kw = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    n = 3 if decoder == "continuous" else 6  # continuous batching on CPU: ~1 s per prompt
    ref = HFLM(**kw).generate_until(_generation_requests(n), disable_tqdm=True)
    lm = evomerge_lm_class()(**kw, generation=decoder)
    assert lm.decoders.chosen == decoder
    from evomerge.memory import resident_peak

    Path("/proc/self/clear_refs").write_text("5")  # the resident peak starts again from here (Linux)
    before = resident_peak()
    assert lm.generate_until(_generation_requests(n), disable_tqdm=True) == ref
    assert any(ref)  # the model says something, so equal texts mean something
    # a cache sized for the batch (left to itself, continuous batching took 90 % of free RAM: 14 GB)
    assert resident_peak() - before < 2**30


def test_auto_measures_every_decoder_and_keeps_one_that_agrees(session_tiny_zoo, tokenizer):
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate.decoding import DECODERS, DecoderChoice

    model = T.AutoModelForCausalLM.from_pretrained(session_tiny_zoo.models["expert_a"]).eval()
    kw = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    lm = evomerge_lm_class()(**kw)
    assert lm.decoders.chosen == "hf" and not lm.decoders.measured  # auto on CPU: generate, unmeasured
    lm.decoders = DecoderChoice("auto", device_type="accelerator")  # what auto does off CPU
    ref = HFLM(**kw).generate_until(_generation_requests(2), disable_tqdm=True)
    assert lm.generate_until(_generation_requests(2), disable_tqdm=True) == ref
    assert lm.decoders.chosen in DECODERS and set(lm.decoders.measured) == set(DECODERS)
    assert "differs" not in lm.decoders.measured[lm.decoders.chosen]
    assert lm.generate_until(_generation_requests(2), disable_tqdm=True) == ref  # the chosen one, again
    with pytest.raises(ValueError, match="unknown generation decoder"):
        DecoderChoice("vllm")
