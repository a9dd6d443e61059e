"""Pure tensor operations on token sequences [B, N, C]: no modules, no model knowledge.

One module per job: :mod:`.match` (bipartite matching), :mod:`.merge` (size-weighted merging),
:mod:`.prune`, :mod:`.scores`, :mod:`.entropy`, :mod:`.kmeans`, :mod:`.group`, :mod:`.apportion`,
:mod:`.complexity`, :mod:`.thresholds`, ... Import them by module; nothing is imported here, so that
light callers (the command line's help) never load torch.
"""
