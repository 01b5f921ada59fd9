"""omni-serve through the official ``openai`` client: completions and chat, streamed and not; streamed text ==
non-streamed text == the offline ``LLM``'s greedy output; usage, logprobs, stop, seed, default max_tokens.

One server subprocess for the module (tiny Llama, float32)."""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from omniops.serving import LLM, SamplingParams
from omniops.serving.cli import build_parser
from tests.serving._server import OmniServer
from tests.serving.conftest import mixed_prompts

openai = pytest.importorskip("openai")

MAX_LEN = 256
ENGINE = {"dtype": "float32", "max_model_len": MAX_LEN, "kv_cache_memory": 0.05}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the old river."}]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("llama")
    srv = OmniServer(path, tmp_path_factory.mktemp("serve-api") / "server.log", "--served-model-name", "tiny",
                     "--max-model-len", str(MAX_LEN), "--kv-cache-memory", "0.05").start()
    yield srv
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: exit status 0 or -SIGTERM
    assert srv.stop() in (0, -signal.SIGTERM) and "Application shutdown complete" in srv.log(), srv.log()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=30, max_retries=0)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), **ENGINE)


def _stream_text(chunks) -> tuple[str, str | None, list]:
    text, finish, rest = "", None, []
    for ch in chunks:
        rest.append(ch)
        for c in ch.choices:
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            finish = c.finish_reason or finish
    return text, finish, rest


def test_models_health_load(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    load = server.load()
    assert set(load) == {"running", "waiting", "kv_cache_usage", "prefill_tokens_in_flight",
                         "decode_tokens_in_flight"}
    assert load["running"] == load["waiting"] == 0


def test_completions_equal_offline_greedy(client, llm):
    for prompt in mixed_prompts(3, seed=5):
        ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        text, finish, _ = _stream_text(client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                                 temperature=0, stream=True))
        assert (text, finish) == (r.choices[0].text, r.choices[0].finish_reason)


def test_chat_equals_offline_greedy(client, llm):
    ref = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=16))[0]
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    msg = r.choices[0].message
    assert (msg.role, msg.content) == ("assistant", ref.outputs[0].text)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    text, finish, chunks = _stream_text(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                                       temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (text, finish) == (msg.content, r.choices[0].finish_reason)
    assert all(ch.usage is None for ch in chunks)


def test_token_id_prompt(client, llm):
    prompt = mixed_prompts(1, seed=9)[0]
    ids = llm.tokenizer.encode(prompt)
    a = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    b = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text and b.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("chat", [False, True])
def test_stream_include_usage(client, chat):
    kw = {"model": "tiny", "max_tokens": 7, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    if chat:
        chunks = list(client.chat.completions.create(messages=CHAT, **kw))
    else:
        chunks = list(client.completions.create(prompt="the quick brown fox", **kw))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert last.usage.total_tokens == last.usage.prompt_tokens + 7
    assert all(ch.usage is None for ch in body) and body[-1].choices[0].finish_reason == "length"


def test_completion_logprobs(client):
    kw = {"model": "tiny", "prompt": "seven bright stars", "max_tokens": 6, "temperature": 0, "logprobs": 3,
          "extra_body": {"ignore_eos": True}}
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # top-3 plus the sampled token, keyed by text: pieces that decode alike ("\ufffd") share one key
        assert v <= 0 and 1 <= len(top) <= 4 and v == pytest.approx(max(top.values()))  # greedy: the top-1
        assert top[tok] == pytest.approx(v)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode(errors="replace") == t.token


def test_stop_string(client):
    kw = {"model": "tiny", "prompt": "near the old river", "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(max_tokens=24, **kw).choices[0].text
    m = re.search(r"[a-z]{3}", full[2:])
    assert m, full
    stop = m[0]
    r = client.completions.create(max_tokens=24, stop=[stop], **kw).choices[0]
    assert (r.text, r.finish_reason) == (full[:full.find(stop)], "stop")
    text, finish, _ = _stream_text(client.completions.create(max_tokens=24, stop=stop, stream=True, **kw))
    assert (text, finish) == (r.text, "stop")


def test_seed_is_reproducible(client):
    kw = {"model": "tiny", "prompt": "birds sing", "max_tokens": 10, "temperature": 1.0, "seed": 7,
          "extra_body": {"top_k": 50, "top_p": 0.95}}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_default_max_tokens_fills_the_context(client):
    r = client.completions.create(model="tiny", prompt="children play", temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_LEN


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=5, max_tokens=50,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_cli_flags():
    p = build_parser()
    a = p.parse_args(["ckpt/dir"])
    assert (a.host, a.port, a.served_model_name, a.enable_prefix_caching, a.max_queue) == \
        ("127.0.0.1", 8000, None, True, None)
    for flag in ("--no-prefix-caching", "--no-enable-prefix-caching"):
        assert p.parse_args(["m", flag]).enable_prefix_caching is False
    a = p.parse_args(["m", "--max-model-len", "64", "--kv-cache-memory", "0.5", "--quantization", "w8a8",
                      "--enforce-eager", "--api-key", "k", "--max-queue", "3", "--max-num-seqs", "4",
                      "--max-num-batched-tokens", "128", "--block-size", "32", "--dtype", "bfloat16"])
    assert (a.max_model_len, a.kv_cache_memory, a.quantization, a.enforce_eager, a.api_key, a.max_queue,
            a.max_num_seqs, a.max_num_batched_tokens, a.block_size, a.dtype) == \
        (64, 0.5, "w8a8", True, "k", 3, 4, 128, 32, "bfloat16")
