"""``omni-proxy``: OpenAI-compatible front of several engines — prefill/decode disaggregation (xPyD) or a
request-level load balancer.

    omni-proxy --port 8000 --prefill URL [URL...] --decode URL [URL...] [--policy NAME] [--decode-policy NAME]
    omni-proxy --port 8000 --backend URL [URL...] [--policy NAME]

Policies (see omniops.serving.proxy.policies for each formula): round_robin, least_outstanding, power_of_two,
cache_aware, prefill_score_balance, pd_score_balance, length_balance, length_bucket. ``--port 0`` picks a free
port (logged: "ready on http://..."). Also runnable as ``python -m omniops.serving.proxy.cli``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from omniops.serving.proxy.policies import POLICIES, CacheAwareConfig

log = logging.getLogger("omniops.serving.proxy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", nargs="+", default=[], metavar="URL", help="mixed engines (plain load balancing)")
    p.add_argument("--prefill", nargs="+", default=[], metavar="URL", help="prefill engines (omni-serve --role "
                   "prefill, or vLLM with a KV connector)")
    p.add_argument("--decode", nargs="+", default=[], metavar="URL", help="decode engines")
    p.add_argument("--policy", choices=POLICIES, default=None, help="mixed or prefill pool (default: "
                   "least_outstanding for mixed engines, prefill_score_balance for prefill engines)")
    p.add_argument("--decode-policy", choices=POLICIES, default="pd_score_balance")
    p.add_argument("--decode-request-limit", type=int, default=64, help="pd_score_balance: requests per engine")
    p.add_argument("--bucket-thresholds", type=int, nargs="+", default=[512], metavar="TOKENS",
                   help="length_bucket: prompt lengths that separate the engine groups")
    p.add_argument("--cache-threshold", type=float, default=0.5, help="cache_aware: matched fraction to follow")
    p.add_argument("--balance-abs-threshold", type=int, default=32)
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument("--tokenizer", default=None, help="a checkpoint directory: exact prompt lengths (default: "
                   "estimated as UTF-8 bytes / 4)")
    p.add_argument("--max-attempts", type=int, default=3, help="attempts per request, retries included")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds without a byte from an engine")
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--health-timeout", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0, help="power_of_two's draws")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream call (health checks too)
    import httpx
    import uvicorn

    from omniops.serving.cli import _bind
    from omniops.serving.proxy.app import build_app
    from omniops.serving.proxy.backends import Backend
    from omniops.serving.proxy.router import Router
    from omniops.serving.proxy.select import Selector

    if args.backend and (args.prefill or args.decode):
        sys.exit("omni-proxy: give either --backend (mixed engines) or --prefill/--decode, not both")
    if not args.backend and not args.decode:
        sys.exit("omni-proxy: no engines: give --backend URL... or --decode URL... [--prefill URL...]")
    if args.max_attempts < 1:
        sys.exit("omni-proxy: --max-attempts must be >= 1")
    cache = CacheAwareConfig(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold)

    def pool(urls: list[str], role: str, policy: str) -> Selector:
        return Selector(policy, [Backend(u.rstrip("/"), role) for u in urls], seed=args.seed, cache=cache,
                        request_limit=args.decode_request_limit, bucket_thresholds=tuple(args.bucket_thresholds))

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256))
    timeout = httpx.Timeout(args.request_timeout, connect=5.0)
    if args.backend:
        router = Router(client, mixed=pool(args.backend, "mixed", args.policy or "least_outstanding"),
                        max_attempts=args.max_attempts, timeout=timeout, tokenizer=tokenizer)
    else:
        router = Router(client, prefill=pool(args.prefill, "prefill", args.policy or "prefill_score_balance")
                        if args.prefill else None, decode=pool(args.decode, "decode", args.decode_policy),
                        max_attempts=args.max_attempts, timeout=timeout, tokenizer=tokenizer)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        sys.exit(f"omni-proxy: {e}")
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if router.pd:
        pp = router.prefill.policy if router.prefill else "-"
        mode = f"{len(args.prefill)}P{len(args.decode)}D, prefill policy {pp}, decode policy {args.decode_policy}"
    else:
        mode = f"{len(args.backend)} mixed engines, policy {router.mixed.policy}"
    log.info("omni-proxy: %s", mode)
    app = build_app(router, health_interval=args.health_interval, health_timeout=args.health_timeout, url=url)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
