"""``tokenbudget explore``: a local web page to see any image merged at any budget.

Pick a sample image or upload one, pick two merging methods, move the budget slider (a keep
fraction or a FLOPs-ideal speedup) and see both methods' merge groups over the image, tokens per
layer, FLOPs, the cosine similarity of the reduced feature to the full one, and the forward time
measured on this machine. Standard library server, one hand-written page: nothing is loaded from
the network.

    from tokenbudget.explore import Explorer, make_server
    server = make_server(Explorer(model), port=0)   # serve_forever() in a thread
"""

from .app import serve
from .images import MAX_PIXELS, MAX_UPLOAD_BYTES, ImageStore, UnknownImage, decode_upload
from .server import make_server
from .session import Explorer, merging_methods

__all__ = [
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "Explorer",
    "ImageStore",
    "UnknownImage",
    "decode_upload",
    "make_server",
    "merging_methods",
    "serve",
]
