"""Beyond one window (issue 14): the window serves its own model and caches to other apps on
localhost, and drives a remote OpenAI-compatible server (here another Cachet) as its engine.

The served requests and the window's own turns share one ChatService from two threads; the tests
check both answer, nothing crosses over, and the server stops with the window."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest

from engine import api_keys
from engine.remote import Endpoint
from engine.server import BackgroundServer
from engine.specs import CacheSpec, SamplingSettings
from engine.store import ChatSettings
from tests.conftest import SHORT, TURN_TIMEOUT_MS

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")  # offscreen

GREEDY = ChatSettings(sampling=SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12),
                      cache=CacheSpec("dynamic"))


@pytest.fixture(autouse=True)
def no_system_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    """API keys go to the file in the test's data folder, never to the keyring of the machine."""
    monkeypatch.setattr(api_keys, "_keyring", lambda: None)


@pytest.fixture
def remote_cachet(tiny_server: Callable[..., BackgroundServer]) -> Callable[..., BackgroundServer]:
    """Another Cachet serving the tiny model on a free loopback port (the 'bigger machine')."""
    return lambda **config: tiny_server("tiny-remote", GREEDY, **config)


def _ask(url: str, text: str, max_tokens: int = 12) -> tuple[str, int]:
    """A greedy chat request through the official client: (reply, cached prompt tokens)."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                         temperature=0.0, max_tokens=max_tokens)
    details = out.usage.prompt_tokens_details if out.usage is not None else None
    return out.choices[0].message.content or "", int(getattr(details, "cached_tokens", 0) or 0)


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/models", timeout=5)  # noqa: S310  (loopback)
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, OSError):
        return True
    return False


def _post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """A chat request with exactly these headers, as a web page's fetch() could send it: (status, error code)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=60)
    body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    return resp.status, answer["error"]["code"] if "error" in answer else ""


def test_the_window_serves_its_model_to_other_apps_while_its_own_chats_go_on(
        qtbot: Any, make_window: Any, tiny_server: Callable[..., BackgroundServer]) -> None:
    win = make_window(sampling=SHORT)
    with qtbot.waitSignal(win.engine.server_state, timeout=TURN_TIMEOUT_MS) as started:
        win.engine.set_server(0)  # a free port (Settings takes 1024–65535)
    state = started.args[0]
    assert state.running and state.url.startswith("http://127.0.0.1:") and state.error is None
    assert win.meters.server_label.isVisibleTo(win) and "Serving on 127.0.0.1:" in win.meters.server_label.text()

    served, _ = _ask(state.url, "Tell me about the sea")
    window_config = win.engine._worker._server.server.config  # the window's server, as the worker made it
    fresh = tiny_server(window_config.model_id, window_config.defaults)  # the same model, served alone
    alone, _ = _ask(fresh.base_url, "Tell me about the sea")
    assert served == alone and served  # greedy: the window's server answers as a server of its own would
    again, cached = _ask(state.url, "Tell me about the sea")  # the same prompt: its cache is reused
    assert again == alone and cached > 0

    # A web page in the user's browser cannot use it: neither a simple cross-origin request nor one
    # through a name of its own pointed at 127.0.0.1 (DNS rebinding) reaches the model.
    assert _post(state.url, {"Content-Type": "text/plain", "Origin": "http://evil.example"}) == (
        403, "origin_not_allowed")
    assert _post(state.url, {"Content-Type": "text/plain"}) == (415, "unsupported_media_type")
    assert _post(state.url, {"Content-Type": "application/json", "Host": "evil.example:8471"}) == (
        400, "host_not_allowed")

    # A request of another app and a message in the window at the same time: both answered, neither
    # with the other's cache (the window's turn waits for the service while the request runs).
    answers: list[str] = []
    other = threading.Thread(target=lambda: answers.append(_ask(state.url, "Tell me about the sea")[0]))
    chat_id = win.new_chat()
    other.start()
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("What is a cache?")
    other.join(timeout=60)
    assert answers == [alone]
    window_reply = win.controller.messages(chat_id)[-1]
    assert window_reply.role == "assistant" and window_reply.status == "done" and window_reply.content

    win.meters.refresh_server()
    assert "3 requests" in win.meters.server_label.text()
    with qtbot.waitSignal(win.engine.server_state, timeout=TURN_TIMEOUT_MS) as stopped:
        win.engine.set_server(None)
    assert not stopped.args[0].running and not win.meters.server_label.isVisibleTo(win)
    assert _refused(state.url)


def test_a_port_in_use_is_said_plainly_and_the_window_goes_on(qtbot: Any, make_window: Any) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        win = make_window(sampling=SHORT)
        with qtbot.waitSignal(win.engine.server_state, timeout=TURN_TIMEOUT_MS) as failed:
            win.engine.set_server(port)
        state = failed.args[0]
        assert not state.running and f"port {port}" in (state.error or "")
        assert "Server off" in win.meters.server_label.text()
        assert "Choose another port" in win.meters.server_label.toolTip()
    chat_id = win.new_chat()
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("Still there?")
    assert win.controller.messages(chat_id)[-1].status == "done"


def test_the_window_drives_a_remote_cachet_server(qtbot: Any, make_window: Any,
                                                   remote_cachet: Callable[..., BackgroundServer]) -> None:
    http = remote_cachet()
    endpoint = Endpoint(http.base_url)  # no model named: the server's first one
    win = make_window(loader=endpoint, sampling=SHORT)
    model = win.engine.model
    assert model.remote == http.base_url and model.name == "tiny-remote"
    assert "tiny-remote" in win.meters.model_label.text() and http.base_url in win.meters.model_label.text()

    chat_id = win.new_chat()
    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("Tell me about the sea")
    first = win.controller.messages(chat_id)[-1]
    assert first.status == "done" and first.content
    assert first.content == _ask(http.base_url, "Tell me about the sea")[0]  # what the server answers anyone

    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.send("And the mountains?")
    stats = win.controller.last_stats(chat_id)
    assert stats is not None and int(str(stats["reused_tokens"])) > 0  # the server's cached_tokens, shown

    with qtbot.waitSignal(win.controller.turn_finished, timeout=TURN_TIMEOUT_MS):
        win.regenerate()
    assert win.controller.messages(chat_id)[-1].status == "done"

    win.dock.show()
    panel = win.settings_panel
    assert "server manages its own cache" in panel.strategy_note.text()
    assert not panel.cache_now.isVisible()  # no "no cache in memory" beside it
    assert panel.temperature.isEnabled() and not panel.strategies.isEnabled() and not panel.speculative.isEnabled()
    assert win._entry(win.store.chat(chat_id)).cache_place == "server"  # the sidebar's badge: "on the server"
    assert all(win.engine.model.availability[s] for s in ("dynamic", "sink", "quantized"))


def test_an_unreachable_server_says_so_and_loses_nothing(qtbot: Any, make_window: Any, monkeypatch: Any) -> None:
    import socket

    from PySide6.QtWidgets import QMessageBox

    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text, *a: warnings.append(text))

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    win = make_window(loader=Endpoint(f"http://127.0.0.1:{port}/v1"), wait_ready=False)
    with qtbot.waitSignal(win.engine.model_failed, timeout=TURN_TIMEOUT_MS) as failed:
        win.start_engine()
    assert "Cannot reach the server" in failed.args[0]
    assert warnings and "Cannot reach the server" in warnings[0] and "Settings" in warnings[0]
    assert "No model" in win.meters.model_label.text()


def test_the_settings_choose_a_remote_server_and_list_its_models(
        qtbot: Any, remote_cachet: Callable[..., BackgroundServer]) -> None:
    from app.config import AppConfig, ConfigError
    from app.settings_dialog import SettingsDialog

    http = remote_cachet(api_key="s3cret")
    dialog = SettingsDialog(AppConfig())
    qtbot.addWidget(dialog)
    assert not dialog.remote_url.isEnabled()
    dialog.remote.setChecked(True)
    assert dialog.remote_url.isEnabled() and not dialog.serve.isEnabled()

    dialog.remote_url.setText("not a url")
    with pytest.raises(ConfigError, match="not a server address"):
        dialog.result_config()

    dialog.remote_url.setText(http.base_url)
    with qtbot.waitSignal(dialog._model_list.done, timeout=TURN_TIMEOUT_MS):
        dialog.fetch_models.click()  # without the key: refused, and said so
    assert "API key" in dialog.remote_note.text()
    dialog.remote_key.setText("s3cret")
    with qtbot.waitSignal(dialog._model_list.done, timeout=TURN_TIMEOUT_MS):
        dialog.fetch_models.click()
    assert dialog.remote_model.currentText() == "tiny-remote" and "offers 1 model" in dialog.remote_note.text()

    config = dialog.result_config()
    assert (config.engine_source, config.remote_url, config.remote_model) == ("remote", http.base_url, "tiny-remote")
    assert config.model == "default"  # the local model is kept for when the user comes back
    dialog.accept()
    assert dialog.key_changed and api_keys.load(http.base_url) == "s3cret"
    assert "s3cret" not in str(config.to_dict())  # the key is never in settings.json

    from app.__main__ import default_loader

    assert default_loader(config) == Endpoint(http.base_url, "tiny-remote", "s3cret")


def test_the_settings_turn_the_local_server_on(qtbot: Any) -> None:
    from app.config import AppConfig, ConfigError
    from app.settings_dialog import SettingsDialog

    dialog = SettingsDialog(AppConfig())
    qtbot.addWidget(dialog)
    assert not dialog.serve.isChecked() and not dialog.serve_port.isEnabled()
    dialog.serve.setChecked(True)
    dialog.serve_port.setValue(9123)
    assert dialog.serve_url.text() == "http://127.0.0.1:9123/v1"
    config = dialog.result_config()
    assert config.serve and config.serve_port == 9123
    with pytest.raises(ConfigError, match="port"):
        AppConfig(serve_port=80).validate()
    assert AppConfig.from_dict({"serve": "yes", "serve_port": "x", "engine_source": "cloud"}) == AppConfig()
