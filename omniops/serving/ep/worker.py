"""The ranks of the expert-parallel engine other than 0, and the model set-up that every rank shares.

``setup_model`` (every rank, same arguments -> same result): replaces each routed-expert ``FusedMoE`` of the
loaded model with an ``EPMoELayer`` holding this rank's slots of the initial placement, and builds the
``PlacementLoop``. ``serve`` is a worker's loop: wait for rank 0's step message, run the same
``model.forward`` (attention replicated, MoE layers expert-parallel), close the step in the recorders and
join the placement sync when flagged; ``STOP`` ends it. Only rank 0 computes logits and samples.

``main(CONFIG_JSON, NUM_BLOCKS)`` runs in a fresh ``python -c`` process with ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` set: what rank 0 starts for local ranks (a fresh interpreter per rank, so
nothing of the caller's ``__main__`` is re-run, unlike multiprocessing's spawn). Under torchrun the ranks > 0
run the same ``omni-serve`` / ``LLM(...)`` command instead and serve from inside ``LLMEngine``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from omniops.serving.ep.comm import STEP, EPGroup, init_groups, recv_step
from omniops.serving.ep.moe import EPMoELayer, moe_layers
from omniops.serving.ep.placement_loop import PlacementLoop, initial_placement

log = logging.getLogger("omniops.serving.ep")

START_TIMEOUT = timedelta(seconds=600)  # model loading on every rank; the store's timeout


def expert_groups(hf_config) -> int:
    """The model's expert groups for hierarchical placement: DeepSeek-V3's group-limited routing, else 1."""
    return int(getattr(hf_config, "n_group", None) or 1)


def check_layout(model, cfg, world: int) -> int:
    """The number of routed experts; ValueError when the layout cannot be split over ``world`` ranks."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"ep: {type(model).__name__} has no routed-expert layers to place")
    E = layers[0][1].num_routed
    if (E + cfg.redundant_experts) % world:
        raise ValueError(f"redundant_experts: {E} experts + {cfg.redundant_experts} redundant slots do not split "
                         f"evenly over ep={world} ranks")
    return E


def setup_model(model, hf_config, group: EPGroup, cfg, num_blocks: int) -> PlacementLoop:
    E = check_layout(model, cfg, group.world)
    blocks = torch.tensor([num_blocks, -num_blocks])
    dist.all_reduce(blocks, op=dist.ReduceOp.MAX, group=group.cpu)  # every rank: the same KV cache layout
    if int(blocks[0]) != -int(blocks[1]):
        raise ValueError("kv_cache_memory: the ranks computed different KV block counts; give every rank the same "
                         "options")
    found = moe_layers(model)
    nodes = cfg.placement_nodes
    if nodes == 1 and group.hosts > 1:  # several hosts: place hierarchically over them unless told otherwise
        nodes = group.hosts
    groups = expert_groups(hf_config)
    placement = initial_placement(E, E + cfg.redundant_experts, group.world, groups, nodes)
    recorder, rank_recorder = PlacementLoop.recorders(len(found), E, group.world, cfg.placement_interval)
    layers = []
    for j, (i, moe) in enumerate(found):
        layer = EPMoELayer(moe, placement, group.rank, group.data, j, recorder, rank_recorder)
        model.layers[i]["mlp"] = layer
        layers.append(layer)
    return PlacementLoop(layers, [i for i, _ in found], rank=group.rank, world=group.world, mode=cfg.placement,
                         interval=cfg.placement_interval, max_moves=cfg.placement_max_moves, num_groups=groups,
                         num_nodes=nodes, cpu=group.cpu, recorder=recorder,
                         rank_recorder=rank_recorder)


@torch.inference_mode()
def serve(model, group: EPGroup, loop: PlacementLoop) -> None:
    """A worker's loop, until rank 0 sends STOP. Raises on a failed collective (rank 0 gone, a peer gone)."""
    while True:
        cmd, ids, meta, sync = recv_step(group)
        if cmd != STEP:
            return
        model.forward(ids, meta)
        loop.after_step(sync)


def connect_store(rank: int, world: int) -> dist.TCPStore:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT: rank 0 hosts it, unless torchrun's agent already does
    (TORCHELASTIC_USE_AGENT_STORE, torch's own env:// rule)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent, timeout=START_TIMEOUT, wait_for_workers=False)


def main(argv: list[str] | None = None) -> None:
    """A local rank started by rank 0: load the model, report ready (or the error) on the store, serve."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{os.environ.get('RANK')} %(levelname)s "
                        "%(name)s: %(message)s")
    from omniops.serving.config import EngineConfig
    from omniops.serving.models import build_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("OMNI_EP_THREADS"):
        torch.set_num_threads(int(os.environ["OMNI_EP_THREADS"]))
    store = connect_store(rank, world)
    try:
        fields = json.loads(argv[0])
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        cfg = EngineConfig(**{k: v for k, v in fields.items() if k in names})
        num_blocks = int(argv[1])
        model, hf_config = build_model(cfg.model, cfg.dtype, quantization=cfg.quantization,
                                       max_positions=cfg.max_model_len)
        model.allocate_kv(num_blocks, cfg.block_size)
        check_layout(model, cfg, world)
    except Exception as e:  # tell rank 0 why, instead of letting it wait for the start-up timeout
        store.set(f"omni_ep/error/{rank}", f"{type(e).__name__}: {e}")
        traceback.print_exc()
        sys.exit(1)
    store.set(f"omni_ep/ready/{rank}", "1")
    group = init_groups(rank, world, cfg.ep_timeout, model.embed.device, store=dist.PrefixStore("omni_ep", store),
                        launched="spawn")
    loop = setup_model(model, hf_config, group, cfg, num_blocks)
    try:
        serve(model, group, loop)
    except Exception as e:  # rank 0 or a peer is gone: exit (closing our sockets fails the others' steps)
        log.error("rank %d: stopping: %s", rank, e)
        sys.exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
