"""torch.compile backend "omni": FX pattern rewrites onto omni ops, then Inductor (installed as
omniops.graph_passes). The passes land with the graph-passes issue; the backend already works."""
