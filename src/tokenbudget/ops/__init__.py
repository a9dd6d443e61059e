"""Pure tensor operations on token sequences [B, N, C]: no modules, no model knowledge."""

from .match import Matching, bipartite_soft_matching, max_mergeable
from .merge import merge_weighted, size_weighted_mean, token_map_to_source, update_token_map

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "max_mergeable",
    "merge_weighted",
    "size_weighted_mean",
    "token_map_to_source",
    "update_token_map",
]
