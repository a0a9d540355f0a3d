"""Fused logit divergences: the whole divergence family streamed over vocabulary tiles.

`terms` defines each divergence as an elementwise term and its derivative; `tiled` is the pure-JAX
twin (scan over vocabulary tiles, custom VJP).
"""
