"""The engine core: ``step()`` = schedule -> one forward over the flat batch -> sample -> detokenize -> outputs.

Single-threaded and synchronous (vLLM v1's EngineCore): callers that serve requests concurrently (the HTTP
server) run it in its own thread and talk to it through queues.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omniops.serving.config import EngineConfig
from omniops.serving.detokenizer import IncrementalDetokenizer
from omniops.serving.kv_cache import KVCacheManager
from omniops.serving.models import build_model
from omniops.serving.outputs import CompletionOutput, RequestOutput
from omniops.serving.request import Request, Status
from omniops.serving.runner import ModelRunner
from omniops.serving.sampler import Sampler
from omniops.serving.sampling_params import SamplingParams
from omniops.serving.scheduler import Scheduler

log = logging.getLogger("omniops.serving")


@dataclass
class EngineCounters:
    """Monotonic totals since start (the Prometheus counters of the server are fed from these)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prompt_tokens_computed: int = 0  # prompt tokens actually run through the model (cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot load the tokenizer from {model_dir}: {e}") from e


def eos_token_ids(model_dir: str, tokenizer, hf_config) -> tuple[int, ...]:
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json"
    for src in (json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None,
                getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.extend(src if isinstance(src, list) else [src])
    return tuple(dict.fromkeys(int(i) for i in ids))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        t0 = time.monotonic()
        self.tokenizer = load_tokenizer(config.model)
        self.model, self.hf_config = build_model(config.model, config.dtype, quantization=config.quantization,
                                                 max_positions=config.max_model_len)
        config.check_model_len(self.hf_config.max_position_embeddings)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = eos_token_ids(config.model, self.tokenizer, self.hf_config)
        bs = config.block_size
        num_blocks = int(config.kv_cache_memory * 2**30 // self.model.kv_bytes_per_block(bs))
        if num_blocks * bs < config.max_model_len:
            raise ValueError(f"kv_cache_memory: {config.kv_cache_memory} GiB holds {num_blocks * bs} tokens, fewer "
                             f"than one max_model_len ({config.max_model_len}) request; raise it or lower "
                             "max_model_len")
        self.model.allocate_kv(num_blocks, bs)
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=config.max_model_len,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, bs)
        self.ep = None  # expert parallel: starts / joins the ranks, splits the MoE layers, replaces self.runner
        if config.ep > 1:
            from omniops.serving.ep import start_ep

            self.ep = start_ep(self, num_blocks)
        elif not config.enforce_eager:
            self.runner.choose_compile(config.max_num_seqs, num_blocks)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.counters = EngineCounters()
        # prefill/decode disaggregation (omniops.serving.kv_transfer.KVConnector), attached by omni-serve --role
        self.kv_connector = None
        self.load_seconds = time.monotonic() - t0
        log.info("engine: %s (%s, %s), %d KV blocks of %d tokens, loaded in %.1f s", config.model,
                 type(self.model).__name__, self.model.dtype, num_blocks, bs, self.load_seconds)

    # ---- requests ------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        n, cap = len(prompt_token_ids), self.config.max_model_len
        if n >= cap:
            raise ValueError(f"prompt: {n} tokens leave no room to generate within max_model_len={cap}")
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: {bad!r} is not a token id in [0, {self.vocab_size})")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival: float | None = None, kv_transfer_params: dict | None = None) -> Request:
        """Queue a request. Raises ValueError / TypeError (naming the field) on bad input; nothing is queued then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
        else:
            raise TypeError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        self.validate_prompt(ids)
        req = Request(request_id, ids, params, text, self.eos_token_ids, arrival)
        # a decode engine's remote-prefill request waits in the connector for its KV, not in the scheduler
        if self.kv_connector is None or not self.kv_connector.takes(req, kv_transfer_params):
            self.scheduler.add(req)
        self.requests[request_id] = req
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, req)
        self.counters.prompt_tokens += len(ids)
        return req

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self._finish(req)
        return True

    def _finish(self, req: Request) -> None:
        if self.kv_connector is not None and self.kv_connector.abort(req):
            req.status = Status.FINISHED  # its KV pull is still writing its blocks: the connector frees them after
        else:
            self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        self.counters.finished[req.finish_reason] = self.counters.finished.get(req.finish_reason, 0) + 1

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or (self.kv_connector is not None and self.kv_connector.has_work())

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()  # the batch tensors too: compiled graphs guard on inference vs normal tensors
    def step(self) -> list[RequestOutput]:
        if self.kv_connector is not None:
            self.kv_connector.poll()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        input_ids, meta, order, last = self.runner.prepare(batch)
        new_tokens = dict(zip(map(id, batch.requests), batch.num_new_tokens, strict=True))
        sampling, rows = [], []
        for req, row in zip(order, last, strict=True):
            n = new_tokens[id(req)]
            if req.num_computed_tokens < req.num_prompt_tokens:
                self.counters.prompt_tokens_computed += min(n, req.num_prompt_tokens - req.num_computed_tokens)
            if req.num_computed_tokens + n == req.num_tokens:
                sampling.append(req)
                rows.append(row)
        logits = self.runner.execute(input_ids, meta, rows)
        for req in order:
            req.num_computed_tokens += new_tokens[id(req)]
            self.kv.cache_computed_blocks(req)
        self.counters.steps += 1
        tokens, logprobs = self.sampler(logits, sampling) if sampling else ([], [])
        now = time.monotonic()
        outputs = []
        for req, tok, lp in zip(sampling, tokens, logprobs, strict=True):
            req.append_token(tok)
            self.counters.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            if req.logprobs is not None:
                req.logprobs.append(lp)
            done = req.check_stop_token(self.config.max_model_len)
            detok = self.detok[req.request_id]
            hit = detok.update()
            if hit is not None:
                req.finish_reason, req.stop_reason, done = "stop", hit, True
            elif done:
                detok.flush()
            if done and self.kv_connector is not None:  # a prefill engine holds the blocks for a decode engine
                req.kv_transfer_out = self.kv_connector.request_finished(req)
            outputs.append(self._output(req, done))
            if done:
                self._finish(req)
        return outputs

    def _output(self, req: Request, finished: bool) -> RequestOutput:
        detok = self.detok.pop(req.request_id) if finished else self.detok[req.request_id]
        detok.delta(finished)
        comp = CompletionOutput(0, detok.text[:detok.sent], list(req.output_token_ids),
                                list(req.logprobs) if req.logprobs is not None else None,
                                req.finish_reason if finished else None, req.stop_reason if finished else None)
        metrics = {"arrival": req.arrival, "first_token": req.first_token_time, "last_token": req.last_token_time,
                   "num_preemptions": req.num_preemptions, "kv_transfer_params": req.kv_transfer_out}
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [comp], finished,
                             max(req.num_cached_tokens, 0), metrics)

    # ---- state for metrics / load balancers ----------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting) + (self.kv_connector.num_waiting() if self.kv_connector is not None else 0),
            "kv_cache_usage": self.kv.usage(),
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": self.kv.queries,
            "prefix_cache_hits": self.kv.hits,
            "prefill_tokens_in_flight": sum(r.num_tokens - r.num_computed_tokens for r in s.running)
            + sum(r.num_tokens for r in s.waiting),
            "decode_tokens_in_flight": sum(r.num_tokens for r in s.running),
        }

    @torch.inference_mode()
    def warmup(self) -> None:
        """One tiny request through the whole path (first-call costs of the kernels, allocator growth); the
        counters and the prefix cache are left as they were."""
        counters, queries, hits = self.counters, self.kv.queries, self.kv.hits
        self.counters = EngineCounters()
        self.add_request("__warmup__", [0, 1, 2], SamplingParams(max_tokens=2, temperature=0.0))
        while "__warmup__" in self.requests:
            self.step()
        self.counters, self.kv.queries, self.kv.hits = counters, queries, hits
        self.kv.pool.reset_prefix_cache()
