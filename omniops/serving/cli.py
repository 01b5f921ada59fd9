"""``omni-serve MODEL_DIR``: an OpenAI-compatible HTTP server on the omniops engine (flags spelled as vLLM's
``vllm serve``).

    omni-serve ./ckpt --port 8000 --served-model-name tiny --max-model-len 2048 --kv-cache-memory 2

``--port 0`` picks a free port; the URL is logged ("ready on http://..."). SIGINT / SIGTERM shut down
gracefully (open streams get 5 s). Also runnable as ``python -m omniops.serving.cli``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

log = logging.getLogger("omniops.serving.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a local Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (logged)")
    p.add_argument("--served-model-name", default=None, help="the model name of the API (default: MODEL as given)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB", help="KV cache size in GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="(vLLM's spelling; --no-prefix-caching also disables it)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help=argparse.SUPPRESS)
    p.add_argument("--quantization", default=None, choices=("w8a8", "fp8_block", "w4a16"))
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of the engine (default: OMP_NUM_THREADS when set, else every core; more "
                        "than one runs the omni kernels on omniops' cooperative pool)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $OMNI_API_KEY)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 503 when more than N requests wait for a seat in the batch (default: no limit)")
    p.add_argument("--role", default="mixed", choices=("mixed", "prefill", "decode"),
                   help="prefill/decode disaggregation behind omni-proxy (vLLM's kv_transfer_params protocol)")
    p.add_argument("--kv-port", type=int, default=0, help="prefill role: the TCP port serving KV blocks (0: any "
                   "free port, logged)")
    p.add_argument("--kv-host", default=None, help="the address the KV port binds (default: --host)")
    p.add_argument("--kv-advertise-host", default=None, help="the address decode engines are told to pull from "
                   "(default: --kv-host; this host's name when that is a wildcard such as 0.0.0.0)")
    p.add_argument("--kv-timeout", type=float, default=30.0, metavar="S",
                   help="prefill role: free held blocks when no decode engine acknowledged them within S seconds")
    p.add_argument("--engine-id", default=None, help="this engine's remote_engine_id (default: random)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core in its own process, the HTTP server in this one (no shared GIL); "
                        "--no-engine-process runs it on a thread here (always so with --ep > 1)")
    g = p.add_argument_group("expert parallel (omniops.serving.ep)")
    g.add_argument("--ep", type=int, default=1, metavar="N", help="ranks the MoE experts are split over (local "
                   "processes, or torchrun's WORLD_SIZE); attention is replicated")
    g.add_argument("--redundant-experts", type=int, default=0, metavar="R", help="extra expert slots per MoE layer")
    g.add_argument("--placement", default="off", choices=("off", "static", "dynamic"),
                   help="static: plan once from the warm-up window; dynamic: incremental update every interval")
    g.add_argument("--placement-interval", type=int, default=32, metavar="STEPS")
    g.add_argument("--placement-max-moves", type=int, default=None, metavar="SLOTS",
                   help="slot changes per layer and dynamic update (default ~10%% of the slots)")
    g.add_argument("--placement-nodes", type=int, default=1, help="hierarchical placement over this many nodes")
    g.add_argument("--ep-timeout", type=float, default=60.0, metavar="S", help="seconds before a hung rank fails")
    p.add_argument("--disable-log-requests", action="store_true", help="no INFO line per request")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def default_threads() -> int:
    """OMP_NUM_THREADS when the environment sets it (as vLLM-CPU honours it), else every core the process may
    use. vLLM-CPU keeps one core for its front end; the engine core's cooperative kernel pool needs no reserved
    core (a helper thread that the HTTP process or a client preempts delays a kernel by one block, and the pool
    then runs alone for a while), and on 2 cores the second core is most of the compute: measured on an Intel
    Xeon with AMX, omni-serve at concurrency 16 gave 403 output tokens/s on 2 threads against 300 on 1."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _bind(host: str, port: int) -> socket.socket:
    # bound here rather than by uvicorn: the real port of --port 0 is known before serving, for the log line
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _isa() -> str:
    import omniops

    info = omniops.cpu_info()
    return f"omni kernels {info['isa']}" if info.get("isa") else f"reference ops ({info.get('reason', 'no _C')})"


def _kv_options(args) -> dict:
    kv_host = args.kv_host or args.host
    advertise = args.kv_advertise_host or (socket.getfqdn() if kv_host in ("0.0.0.0", "::", "") else kv_host)
    return {"host": kv_host, "port": args.kv_port, "timeout": args.kv_timeout, "engine_id": args.engine_id,
            "advertise_host": advertise}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from omniops.serving import EngineConfig
    from omniops.serving.api import build_app
    from omniops.serving.engine_core import CoreSpec, EngineProcess, start_engine

    threads = args.threads or default_threads()
    if threads < 1:
        raise SystemExit("omni-serve: --threads must be >= 1")
    try:
        cfg = EngineConfig.from_kwargs(
            args.model, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
            block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
            quantization=args.quantization, enforce_eager=args.enforce_eager, seed=args.seed, ep=args.ep,
            redundant_experts=args.redundant_experts, placement=args.placement,
            placement_interval=args.placement_interval, placement_max_moves=args.placement_max_moves,
            placement_nodes=args.placement_nodes, ep_timeout=args.ep_timeout)
        if args.max_queue is not None and args.max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {args.max_queue}")
        sock = _bind(args.host, args.port)
        spec = CoreSpec(cfg, threads, args.role, _kv_options(args) if args.role != "mixed" else {},
                        args.log_level.upper())
        # expert parallel: rank 0 drives its ranks from this process (they are processes already)
        in_process = not args.engine_process or cfg.ep > 1
        if in_process:
            engine, info = start_engine(spec)
        else:
            torch.set_num_threads(1)  # this process only serves HTTP: the cores are the engine core's
            engine = EngineProcess(spec).start()
            info = engine.info
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # RuntimeError: an EP rank / the core failed
        sys.exit(f"omni-serve: {e}")
    kv = info["kv"]
    kv_note = "" if kv is None else (f", role {args.role} ({kv['engine_id']}"
                                     + (f", KV port {kv['host']}:{kv['port']}" if kv["port"] else "") + ")")
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    name = args.served_model_name or args.model
    log.info("omni-serve: model %s as %r, %s, dtype %s, %s, %d KV blocks of %d tokens, max_model_len %d, "
             "prefix caching %s%s%s, engine %s with %d threads, %s", args.model, name, info["model_class"],
             info["dtype"], _isa(), info["num_blocks"], cfg.block_size, cfg.max_model_len,
             "on" if cfg.enable_prefix_caching else "off", f", runner {info['runner']}" if info["runner"] else "",
             kv_note, "in process" if in_process else "core process", info["threads"], url)
    app = build_app(engine, served_model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                    log_requests=not args.disable_log_requests, url=url)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.disable_uvicorn_access_log,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def engine_died(err: BaseException) -> None:  # the core process exited: stop serving, exit non-zero
        failure.append(err)
        server.should_exit = True

    app.state.engine.on_dead.append(engine_died)
    ep = getattr(engine, "ep", None)
    if ep is not None:  # EP metrics on /metrics; a dead rank shuts the server down (exit status 1)
        from omniops.serving.ep.metrics import attach_server

        attach_server(ep, app, server, name)
    server.run(sockets=[sock])
    if ep is not None:
        ep.shutdown()
        if ep.error is not None:
            sys.exit(f"omni-serve: {ep.error}")
    if failure:
        sys.exit(f"omni-serve: {failure[0]}")


if __name__ == "__main__":
    main()
