"""Start the explorer on a model by name and serve until interrupted."""

from __future__ import annotations

import time
from collections.abc import Callable

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _say(text: str) -> None:
    print(text, flush=True)  # flushed: a process reading our output waits for the address line


def serve(
    model: str = "dinov2_small",
    host: str = "127.0.0.1",
    port: int = 7860,
    img_size: int | None = None,
    threads: int | None = None,
    say: Callable[[str], None] = _say,
    verbose: bool = False,
    pretrained: bool = False,
) -> None:
    """Load ``model`` (any name :func:`tokenbudget.models.load_model` takes), start the explorer on
    ``host:port`` and serve until Ctrl-C. Binds to this machine only unless ``host`` says otherwise."""
    import torch

    from ..models import load_model
    from .server import make_server
    from .session import Explorer

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535] (0: any free port), got {port}")
    start = time.perf_counter()
    explorer = Explorer(load_model(model, pretrained=pretrained, img_size=img_size), model_name=model)
    try:
        server = make_server(explorer, host, port, verbose=verbose)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err}); choose another --port or --host") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    say(
        f"tokenbudget explore: {model} loaded in {time.perf_counter() - start:.1f} s, "
        f"{torch.get_num_threads()} threads; open http://{shown}:{bound_port}/ (Ctrl-C stops)"
    )
    if host not in LOCAL_HOSTS:
        say(f"note: listening on {host}: other machines on the network can reach the explorer")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()
        explorer.close()
