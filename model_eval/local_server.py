"""Serve the embedded local models over an OpenAI-compatible API on loopback.

One llama-cpp-python server process serves every requested model. It keeps a
single model in memory and swaps it on demand when a request names another
alias, which costs well under a second for these small models and keeps memory
flat. litellm then reaches a model as ``openai/<alias>`` with ``api_base``.

A server that already answers on the port with every requested alias is reused
rather than restarted, so consecutive Dagster runs or partitions share one
process; only the LocalModelServer that started a process ever stops it.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from model_eval.errors import ModelEvalError
from model_eval.file_lock import exclusive_lock
from model_eval.local_models import get_local_model

# llama.cpp settings for every served model. The models are tiny; what matters
# is the 2-core CPU machine this runs on.
N_CTX = 2048
# llama.cpp's worker threads busy-wait for each other at every step. With 2
# threads on 2 cores that is fastest on an idle machine, but as soon as any
# other process wants a core one thread keeps getting descheduled and a request
# can take 5-10x longer; 1 thread is ~30% slower at best but steady. The
# pipeline itself (and CI) shares these cores, so the default is 1.
N_THREADS = 1

# How long a single HTTP probe may take. /v1/models waits for the server's
# model lock, so a server busy with a long generation answers late; start()
# keeps retrying until startup_timeout_s rather than relying on one probe.
_PROBE_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.25
_STOP_GRACE_S = 10.0
_LOG_TAIL_LINES = 40

# urllib honours http_proxy/HTTP_PROXY; a loopback server must never be asked
# through a proxy, so probes use an opener with proxies switched off.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalServerError(ModelEvalError):
    """The local model server could not be started, reached or reused."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalModelServer:
    """Start (or reuse) one llama-cpp-python server for several local models.

    ``models`` maps the alias clients ask for (``openai/<alias>`` in litellm)
    to a local model name from ``model_eval.local_models``. The first alias is
    the one loaded at startup.

    Use as a context manager, or call start() and stop() yourself.
    """

    def __init__(
        self,
        models: dict[str, str],
        host: str = "127.0.0.1",
        port: int = 8765,
        log_path: Path | None = None,
        startup_timeout_s: float = 120,
        n_threads: int = N_THREADS,
    ) -> None:
        if not models:
            raise LocalServerError("LocalModelServer needs at least one model to serve")
        # The server has no authentication; it must never be reachable from
        # another machine.
        if not is_loopback(host):
            raise LocalServerError(
                f"refusing to serve local models on {host!r}: only loopback "
                "addresses (127.0.0.1, ::1, localhost) are allowed"
            )
        for alias, local_name in models.items():
            if not alias or "/" in alias:
                raise LocalServerError(f"invalid model alias {alias!r}: it must be non-empty and contain no '/'")
            # Unknown names fail here, before anything is started.
            get_local_model(local_name)

        self.models = dict(models)
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.n_threads = n_threads
        self.reused = False

        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file_path: Path | None = None

    # -- public API -----------------------------------------------------------

    @property
    def api_base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def owns_process(self) -> bool:
        return self._process is not None

    def start(self) -> LocalModelServer:
        """Reuse a compatible server on host:port, or start and own a new one."""
        if self._process is not None or self.reused:
            return self
        # Two processes (say, parallel Dagster steps) starting at once would
        # both find the port free and both launch; the loser's server would die
        # on bind only after loading a model. A per-port lock makes the second
        # one wait and then reuse the first one's server instead.
        with self._port_lock():
            served = self._wait_for_any_answer()
            if served is not None:
                self._reuse(served)
            else:
                self._launch()
        return self

    def stop(self) -> None:
        """Stop the server if this object started it; a reused one is left up."""
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            if process.poll() is None:
                process.terminate()  # uvicorn shuts down cleanly on SIGTERM
                try:
                    process.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self.reused = False

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def served_aliases(self) -> list[str] | None:
        """Aliases the server on host:port lists, or None if nothing answers."""
        return self._probe()

    # -- reuse ------------------------------------------------------------------

    def _reuse(self, served: list[str]) -> None:
        missing = sorted(set(self.models) - set(served))
        if missing:
            raise LocalServerError(
                f"a server at {self.api_base} is already running but does not serve "
                f"{', '.join(missing)} (it serves: {', '.join(served) or 'nothing'}); "
                f"stop it or choose another port"
            )
        self.reused = True

    def _wait_for_any_answer(self) -> list[str] | None:
        """Aliases of a server already on the port; None if the port is free.

        If something accepts connections but does not answer in time (a
        server busy generating, or a foreign program), keep asking until the
        startup timeout, then give up with a clear error.
        """
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                return self._probe()
            except LocalServerError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_POLL_INTERVAL_S)

    def _probe(self) -> list[str] | None:
        """GET /v1/models. None: nothing listens. Raises if the answer is unusable."""
        try:
            with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT_S):
                pass
        except OSError:
            return None  # connection refused: the port is free
        try:
            with _NO_PROXY_OPENER.open(f"{self.api_base}/models", timeout=_PROBE_TIMEOUT_S) as response:
                body = json.load(response)
            return [str(entry["id"]) for entry in body["data"]]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalServerError(
                f"something is listening on {self.host}:{self.port} but does not answer "
                f"GET /v1/models like a llama-cpp-python server ({exc}); stop it or choose another port"
            ) from exc

    # -- launch -----------------------------------------------------------------

    def _server_config(self) -> dict:
        assert self._workdir is not None
        model_configs = []
        for alias, local_name in self.models.items():
            local_model = get_local_model(local_name)
            model_path = local_model.locate()
            # Only the first model is loaded at startup; check the others now
            # rather than as an HTTP 500 on their first request.
            if not model_path.is_file():
                raise LocalServerError(f"weights for local model {local_name!r} not found at {model_path}")
            config = {
                "model": str(model_path),
                "model_alias": alias,
                "n_ctx": N_CTX,
                "n_threads": self.n_threads,
                "n_threads_batch": self.n_threads,
                # The server's default (True) keeps logits for every position:
                # an n_ctx x vocab float array, ~2 GB for Gemma's 262k vocab,
                # and slower prompts. It is only needed for logprobs.
                "logits_all": False,
                # Locking pages would fail under the default memlock limit
                # and only print warnings.
                "use_mlock": False,
                # Per-request timing dumps would swamp the log.
                "verbose": False,
            }
            if local_model.chat_template_config is not None:
                template_path = self._workdir / f"{alias}.tokenizer_config.json"
                template_path.write_text(json.dumps(local_model.chat_template_config))
                config["chat_format"] = "hf-tokenizer-config"
                config["hf_tokenizer_config_path"] = str(template_path)
            model_configs.append(config)
        return {"host": self.host, "port": self.port, "models": model_configs}

    def _launch(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="model_eval_llama_"))
        try:
            config_path = self._workdir / "server_config.json"
            config_path.write_text(json.dumps(self._server_config(), indent=2))

            self._log_file_path = self.log_path or self._workdir / "server.log"
            self._log_file_path.parent.mkdir(parents=True, exist_ok=True)

            env = dict(os.environ)
            # llama_cpp.server lets these variables override the config file.
            env.pop("CONFIG_FILE", None)
            env["HOST"] = self.host
            env["PORT"] = str(self.port)
            command = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config_path)]
            with open(self._log_file_path, "ab") as log_file:
                log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
                log_file.flush()
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            # Should the caller forget stop() (no context manager, crash in
            # between), don't leave the server running after this interpreter.
            atexit.register(self.stop)
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise LocalServerError(
                    f"the local model server exited with code {code} during startup; "
                    f"last lines of {self._log_file_path}:\n{self._log_tail()}"
                )
            try:
                served = self._probe()
            except LocalServerError:
                served = None  # bound but not answering yet
            if served is not None:
                missing = set(self.models) - set(served)
                if missing:  # cannot happen with our own config, but never guess
                    raise LocalServerError(
                        f"the local model server started but does not list {', '.join(sorted(missing))}"
                    )
                return
            if time.monotonic() >= deadline:
                raise LocalServerError(
                    f"the local model server did not answer at {self.api_base} within "
                    f"{self.startup_timeout_s:g}s; last lines of {self._log_file_path}:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _log_tail(self) -> str:
        if self._log_file_path is None:
            return "(no log)"
        try:
            lines = self._log_file_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _port_lock(self):
        # One small file per port, kept (deleting a lock file races with its
        # next user), in a folder of its own so they don't litter /tmp.
        lock_path = Path(tempfile.gettempdir()) / "model_eval_llama_locks" / f"port_{self.port}.lock"
        return exclusive_lock(lock_path, self.startup_timeout_s, lambda: LocalServerError(
            f"another process has been starting a local model server on port "
            f"{self.port} for over {self.startup_timeout_s:g}s (lock {lock_path})"), poll_s=_POLL_INTERVAL_S)
