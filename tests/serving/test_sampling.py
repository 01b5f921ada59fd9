"""Sampling parameters, log-probabilities, stop conditions and incremental detokenization through the engine."""

from __future__ import annotations

import pytest
import torch

from omniops.serving import LLM, SamplingParams
from omniops.serving.sampler import _filter
from tests.serving.conftest import mixed_prompts


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), dtype="float32", max_model_len=512, kv_cache_memory=0.05, enforce_eager=True)


def test_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(_filter(logits, 2, 1.0, 0.0)).tolist() == [False, False, True, True]
    p = logits.softmax(-1)
    kept = ~torch.isinf(_filter(logits, 0, float(p[0] + 0.01), 0.0))
    assert kept.tolist() == [True, True, False, False]  # the smallest set reaching top_p
    kept = ~torch.isinf(_filter(logits, 0, 1.0, float(p[1] / p[0]) + 1e-3))
    assert kept.tolist() == [True, False, False, False]


def test_seeded_sampling_reproducible_whatever_the_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate("a seeded prompt", sp)[0].outputs[0].token_ids
    crowd = llm.generate(["a seeded prompt"] + mixed_prompts(5, seed=9),
                         [sp] + [SamplingParams(temperature=1.0, max_tokens=12)] * 5)
    assert crowd[0].outputs[0].token_ids == alone
    other = llm.generate("a seeded prompt", SamplingParams(temperature=1.0, seed=124, max_tokens=12,
                                                            ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_degenerate_filters_equal_greedy(llm):
    greedy = llm.generate("the fox", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    for sp in (SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True, seed=1),
               SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=8, ignore_eos=True, seed=1),
               SamplingParams(temperature=0.8, min_p=1.0, max_tokens=8, ignore_eos=True, seed=1)):
        assert llm.generate("the fox", sp)[0].outputs[0].token_ids == greedy.outputs[0].token_ids


def test_logprobs_are_the_models(llm):
    out = llm.generate("the fox", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3))[0]
    eng = llm.engine
    seq = out.prompt_token_ids + out.outputs[0].token_ids
    req = eng.add_request("lp", seq, SamplingParams(max_tokens=1))
    input_ids, meta, _, _ = eng.runner.prepare(eng.scheduler.schedule())
    n = len(out.prompt_token_ids)
    logp = torch.log_softmax(eng.runner.execute(input_ids, meta, list(range(n - 1, len(seq) - 1))), -1)
    eng.abort_request(req.request_id)
    for i, (tok, d) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)):
        assert len(d) == 3 and d[tok].rank == 1  # greedy: the sampled token is the top one
        for t, lp in d.items():
            assert lp.logprob == pytest.approx(float(logp[i, t]), abs=1e-4)
        assert sorted(d, key=lambda t: d[t].rank) == logp[i].topk(3).indices.tolist()
    eng.kv.check_all_free()


def test_max_tokens_stop_ids_and_eos(llm):
    base = llm.generate("a b c", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    stop_tok = base.token_ids[3]
    out = llm.generate("a b c", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0]
    first = base.token_ids.index(stop_tok)
    assert out.outputs[0].token_ids == base.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_tok
    eng = llm.engine  # EOS: treat the 3rd generated token as the model's EOS for one request
    req = eng.add_request("eos", base_prompt_ids := llm.generate("a b c", SamplingParams(max_tokens=1))[0]
                          .prompt_token_ids, SamplingParams(temperature=0, max_tokens=10))
    req.eos_token_ids = (base.token_ids[2],)
    while eng.has_unfinished_requests():
        (last,) = eng.step()
    assert last.outputs[0].token_ids == base.token_ids[:base.token_ids.index(base.token_ids[2]) + 1]
    assert last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason is None
    assert base_prompt_ids == last.prompt_token_ids
    ignored = llm.generate("a b c", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert ignored.outputs[0].token_ids == base.token_ids


def test_stop_strings_cut_the_text(llm):
    base = llm.generate("the lazy dog", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[5:8]
    assert len(stop) == 3 and stop.strip()
    out = llm.generate("the lazy dog", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      stop=[stop]))[0].outputs[0]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate("the lazy dog", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[:text.index(stop) + 3]


def test_streamed_text_never_has_a_broken_character(llm):
    """Cumulative text per step only grows by whole characters and ends equal to decoding all tokens."""
    eng = llm.engine
    eng.add_request("s", "ü中文 😀 é", SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True))
    texts = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            texts.append(o.outputs[0].text)
            final = o
    for a, b in zip(texts, texts[1:], strict=False):
        assert b.startswith(a)
    for t in texts[:-1]:
        assert "\ufffd" not in t[-1:]  # a partial UTF-8 sequence is held back, not sent as U+FFFD
    assert texts[-1] == eng.tokenizer.decode(final.outputs[0].token_ids, skip_special_tokens=True)
