"""/v1/completions and /v1/chat/completions: request -> token ids + SamplingParams -> AsyncEngine -> OpenAI
response, or server-sent events when ``stream`` is set.

Tokenization and chat templates run here, on the event loop, with the server's OWN tokenizer instance: the
engine thread's tokenizer is never shared across threads, and the prompt length is known before the request is
queued (for the max_model_len check and the default max_tokens).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from omniops.serving.api import protocol as P
from omniops.serving.async_engine import AsyncEngine, EngineError, QueueFullError, RequestStream
from omniops.serving.outputs import CompletionOutput, RequestOutput
from omniops.serving.sampling_params import SamplingParams

log = logging.getLogger("omniops.serving.api")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> Response:
        body = P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))
        return Response(body.model_dump_json(), status_code=self.status, media_type="application/json")


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) response was ready."""


def _field(e: BaseException) -> str | None:
    """The engine's and SamplingParams' messages start with the field they are about: 'max_tokens: ...'."""
    m = re.match(r"(\w+): ", str(e))
    return m[1] if m else None


async def until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; cancel it (its finally aborts the request) if the client disconnects first. The body has
    been read, so the next ASGI message can only be http.disconnect."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (shutdown): the work must not outlive it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


class _SSEResponse(StreamingResponse):
    """Closes the event generator however the response ends (a disconnect cancels the send, which leaves the
    generator suspended at a yield): its finally aborts the request at once instead of whenever it is GC'd."""

    def __init__(self, gen: AsyncIterator[str]):
        super().__init__(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()


def _sse(obj: BaseModel, usage: bool) -> str:
    # OpenAI: with stream_options.include_usage every chunk has "usage": null and a last chunk carries it;
    # without, no chunk has the field
    exclude = {"kv_transfer_params"} if usage else {"usage", "kv_transfer_params"}  # the latter: never in chunks
    return f"data: {obj.model_dump_json(exclude=exclude)}\n\n"


def _json(body: BaseModel) -> Response:
    # kv_transfer_params only appear in a prefill engine's answers (vLLM's shape); other responses keep OpenAI's
    exclude = {"kv_transfer_params"} if getattr(body, "kv_transfer_params", None) is None else None
    return Response(body.model_dump_json(exclude=exclude), media_type="application/json")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, max_model_len: int,
                 log_requests: bool = True):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.log_requests = log_requests
        self._pieces: dict[int, str] = {}  # token id -> its text alone (logprobs), at most vocab-size entries

    # ---- request -> engine inputs --------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def completion_prompt(self, req: P.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one "
                               "request per prompt", param="prompt")
            prompt = prompt[0]
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return ids

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        msgs = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                bad = next((p.type for p in content if p.type != "text"), None)
                if bad is not None:
                    raise APIError(400, f"messages[{i}].content: part type {bad!r} is not supported (text only)",
                                   param="messages")
                content = "\n".join(p.text or "" for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # no template, or the template raised (jinja's TemplateError)
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from e
        # the template already holds the special tokens: no BOS added again (as LLM.chat does)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sampling_params(self, req: P._SamplingFields, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name}: not supported (must be 0 or absent)", param=name)
        if req.logit_bias:
            raise APIError(400, "logit_bias: not supported", param="logit_bias")
        cap = self.max_model_len
        if prompt_len >= cap:
            raise APIError(400, f"This model's maximum context length is {cap} tokens. However, your prompt has "
                           f"{prompt_len} tokens, which leaves no room to generate.", param="prompt")
        if max_tokens is None:
            max_tokens = cap - prompt_len  # vLLM's default: as much as the context allows
        elif max_tokens >= 1 and prompt_len + max_tokens > cap:
            raise APIError(400, f"This model's maximum context length is {cap} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                           "completion). Please reduce the length of the prompt or max_tokens.", param="max_tokens")
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=_field(e)) from e

    async def start(self, rid: str, ids: list[int], params: SamplingParams, arrival: float,
                    kv_transfer_params: dict | None = None) -> RequestStream:
        try:
            return await self.engine.add(rid, ids, params, arrival, kv_transfer_params)
        except QueueFullError as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded") from e
        except EngineError as e:
            raise APIError(503, str(e), type="server_error", code="engine_unavailable") from e
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=_field(e)) from e

    # ---- logprobs ------------------------------------------------------------------------------------------
    def piece(self, tid: int) -> str:
        s = self._pieces.get(tid)
        if s is None:
            s = self._pieces[tid] = self.tokenizer.decode([tid])
        return s

    def legacy_logprobs(self, c: CompletionOutput, start: int, end: int, offset: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for tid, d in zip(c.token_ids[start:end], c.logprobs[start:end], strict=True):
            tok = self.piece(tid)
            lp.tokens.append(tok)
            lp.token_logprobs.append(d[tid].logprob)
            top: dict[str, float] = {}
            for t, v in sorted(d.items(), key=lambda x: x[1].rank):
                top.setdefault(self.piece(t), v.logprob)  # pieces can collide ("\ufffd"): keep the likelier
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def chat_logprobs(self, c: CompletionOutput, start: int, end: int, top_n: int) -> P.ChatLogprobs:
        content = []
        for tid, d in zip(c.token_ids[start:end], c.logprobs[start:end], strict=True):
            tok = self.piece(tid)
            tops = [P.TopLogprob(token=self.piece(t), logprob=v.logprob, bytes=list(self.piece(t).encode()))
                    for t, v in sorted(d.items(), key=lambda x: x[1].rank) if v.rank <= top_n]
            content.append(P.TokenLogprob(token=tok, logprob=d[tid].logprob, bytes=list(tok.encode()),
                                          top_logprobs=tops))
        return P.ChatLogprobs(content=content)

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def completion(self, req: P.CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        for name, bad in (("echo", req.echo), ("suffix", req.suffix), ("best_of", (req.best_of or 1) > 1)):
            if bad:
                raise APIError(400, f"{name}: not supported", param=name)
        ids = self.completion_prompt(req)
        params = self.sampling_params(req, len(ids), req.max_tokens, req.logprobs)

        def choice(c: CompletionOutput) -> P.CompletionChoice:
            lp = self.legacy_logprobs(c, 0, len(c.token_ids), 0) if req.logprobs is not None else None
            return P.CompletionChoice(text=c.text, logprobs=lp, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason)

        return await self._answer(req, raw, ids, params, arrival, choice, chat=False)

    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self.check_model(req.model)
        if req.tools:
            raise APIError(400, "tools: tool calling is not supported", param="tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        ids = self.chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self.sampling_params(req, len(ids), max_tokens, (req.top_logprobs or 0) if req.logprobs else None)

        def choice(c: CompletionOutput) -> P.ChatChoice:
            lp = self.chat_logprobs(c, 0, len(c.token_ids), req.top_logprobs or 0) if req.logprobs else None
            return P.ChatChoice(message=P.ChatResponseMessage(content=c.text), logprobs=lp,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

        return await self._answer(req, raw, ids, params, arrival, choice, chat=True)

    async def _answer(self, req: P.CompletionRequest | P.ChatCompletionRequest, raw: Request, ids: list[int],
                      params: SamplingParams, arrival: float,
                      choice: Callable[[CompletionOutput], P.CompletionChoice | P.ChatChoice], *,
                      chat: bool) -> Response:
        """Start the request; stream it (SSE) when ``req.stream``, else answer one response whose only choice is
        ``choice(output)`` of the finished request."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream = await self.start(rid, ids, params, arrival, req.kv_transfer_params)
        if req.stream:
            return _SSEResponse(self._stream(stream, req, arrival, chat=chat))
        out = await self._collect(stream, raw, arrival)
        response = P.ChatCompletionResponse if chat else P.CompletionResponse
        body = response(id=rid, model=self.model_name, choices=[choice(out.outputs[0])], usage=self._usage(out),
                        kv_transfer_params=out.metrics.get("kv_transfer_params"))
        return _json(body)

    # ---- generation ----------------------------------------------------------------------------------------
    @staticmethod
    def _usage(out: RequestOutput) -> P.Usage:
        p, c = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=out.num_cached_tokens))

    async def _collect(self, stream: RequestStream, raw: Request, arrival: float) -> RequestOutput:
        async def run() -> RequestOutput:
            last = None
            async for out in stream:
                last = out
            return last

        last, status = None, "failed"
        try:
            last = await until_disconnect(raw, run())
            status = "ok"
            return last
        except ClientGone:
            status = "client gone"
            raise
        except EngineError as e:
            raise APIError(500, str(e), type="server_error", code="engine_error") from e
        finally:
            stream.close()
            self._log(stream.request_id, status, last, arrival)

    async def _stream(self, stream: RequestStream, req: P._SamplingFields, arrival: float,
                      chat: bool) -> AsyncIterator[str]:
        rid, created, model = stream.request_id, int(time.time()), self.model_name
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        top_n = getattr(req, "top_logprobs", None) or 0
        want_lp = bool(req.logprobs) if chat else req.logprobs is not None
        sent_chars = sent_tokens = offset = 0
        last, status = None, "client gone"
        try:
            if chat:  # the first chunk names the role
                delta = P.ChatDelta(role="assistant", content="")
                yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                    P.ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=None)]), usage_on)
            async for out in stream:
                last, c = out, out.outputs[0]
                text, n = c.text[sent_chars:], len(c.token_ids)
                if not text and c.finish_reason is None and not (want_lp and n > sent_tokens):
                    continue  # nothing to send yet (a stop-string holdback or a partial character)
                fin = {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason} if c.finish_reason \
                    else {"finish_reason": None}
                if chat:
                    lp = self.chat_logprobs(c, sent_tokens, n, top_n) if want_lp else None
                    choice = P.ChatChunkChoice(index=0, delta=P.ChatDelta(content=text) if text else P.ChatDelta(),
                                               logprobs=lp, **fin)
                    yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]), usage_on)
                else:
                    lp = self.legacy_logprobs(c, sent_tokens, n, offset) if want_lp else None
                    if lp is not None:
                        offset += sum(map(len, lp.tokens))
                    choice = P.CompletionChoice(index=0, text=text, logprobs=lp, **fin)
                    yield _sse(P.CompletionResponse(id=rid, created=created, model=model, choices=[choice]), usage_on)
                sent_chars, sent_tokens = len(c.text), n
            if usage_on and last is not None:
                cls = P.ChatCompletionChunk if chat else P.CompletionResponse
                yield _sse(cls(id=rid, created=created, model=model, choices=[], usage=self._usage(last)), True)
            status = "ok"
            yield "data: [DONE]\n\n"
        except Exception as e:  # EngineError, or a bug: the status line is sent, so report it in the stream
            status = "failed"
            if not isinstance(e, EngineError):
                log.exception("%s: streaming failed", rid)
            err = APIError(500, str(e), type="server_error", code="engine_error")
            yield f"data: {err.response().body.decode()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            stream.close()  # a disconnect lands here too: the abort frees the request's KV blocks
            self._log(rid, status, last, arrival)

    def _log(self, rid: str, status: str, out: RequestOutput | None, arrival: float) -> None:
        if not self.log_requests:
            return
        now = time.monotonic()
        if out is None:
            log.info("%s: %s, no tokens, %.3f s", rid, status, now - arrival)
            return
        m, c = out.metrics, out.outputs[0]
        ttft = m["first_token"] - arrival if m.get("first_token") is not None else float("nan")
        log.info("%s: %s, prompt %d tokens (%d cached), completion %d tokens, finish %s, %.3f s (ttft %.3f s)",
                 rid, status, len(out.prompt_token_ids), out.num_cached_tokens, len(c.token_ids),
                 c.finish_reason, now - arrival, ttft)
