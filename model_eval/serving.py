"""Start the bundled llama.cpp server when a run needs a local model (or reuse one already up)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from model_eval.registry import ModelSpec, Registry


@contextmanager
def local_models_served(registry: Registry, specs: list[ModelSpec], log_dir: Path) -> Iterator[None]:
    """Serve every local model of the registry while the block runs, if any of `specs` is local.

    All of the registry's local models are served by the one process, so a server started for one
    partition can be reused by the next one (or by a `model-eval run` that started it first).
    """
    if not any(s.local_model for s in specs):
        yield
        return
    from model_eval.local_server import LocalModelServer

    server = LocalModelServer(
        models=registry.local_models(),
        host=registry.local_server.host,
        port=registry.local_server.port,
        log_path=log_dir / "llama_server.log",
    )
    server.start()
    try:
        yield
    finally:
        server.stop()  # stops only a server this block started
