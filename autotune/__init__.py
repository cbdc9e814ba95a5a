"""Autotuning and the tuning cache (installed as ``slagen.autotune``).

records   the JSON record schema, shape buckets, the running stack's versions
cache     the on-disk tuning cache (user dir + read-only shared dirs), locking and merging
bundle    portable export/import of records and compiled artifacts
space     per-backend search spaces, pruned by the arch's limits
tuner     timing candidates on the GPU, checking each against the reference
select    the config a kernel launch uses: memory → user cache → shared caches → defaults
"""
