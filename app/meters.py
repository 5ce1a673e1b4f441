"""The status bar: model and device, memory held by the weights and by the KV caches and what is
free (refreshed every second), the local server for other apps and what it served, and the last
turn's reuse, time to first token and speed."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar

from app.protocol import CacheRestored, ModelInfo, ServerState
from app.texts import human_bytes


def describe_restore(restore: CacheRestored) -> str:
    """"cache restored from disk in 120 ms (1,234 tokens)", for the status bar and a reply's hover."""
    took = f"{restore.seconds * 1000:,.0f} ms" if restore.seconds < 1 else f"{restore.seconds:,.1f} s"
    count = f" ({restore.tokens:,} tokens)" if restore.tokens else ""
    if restore.source == "device":
        return "cache was already on the GPU" if restore.on_gpu else "cache was already in memory"
    if restore.source == "ram":
        return f"cache restored from RAM in {took}{count}"
    if restore.source == "disk":
        return f"cache restored from disk in {took}{count}"
    if restore.source == "shared":
        return f"{restore.tokens:,} tokens reused from another chat (copied in {took})"
    if restore.source == "recomputed":
        return f"cache recomputed from the messages in {took}{count}"
    return "no cache yet"


def free_bytes(device: str) -> int:
    """Memory free for new KV caches on `device` now (the engine reads it; only asked once a model is loaded)."""
    from engine.service import free_memory

    return free_memory(device)


class Meters:
    def __init__(self, bar: QStatusBar) -> None:
        self.bar = bar
        self.model_label = QLabel("Starting…")
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setMaximumWidth(120)
        self.progress.setMaximumHeight(12)
        self.progress.setTextVisible(False)
        self.memory_label = QLabel()
        self.turn_label = QLabel()
        self.server_label = QLabel()
        self.server_label.hide()
        self.server: ServerState = ServerState(False)
        self.memory_tip = "Memory held by the model's weights and by the KV caches of all chats, and what is still free"
        self.memory_label.setToolTip(self.memory_tip)
        self.turn_tip = ("The last reply: prompt tokens reused from the cache vs. computed, time to first token, "
                         "decoding speed")
        self.turn_label.setToolTip(self.turn_tip)
        bar.addWidget(self.model_label)
        bar.addWidget(self.progress)
        bar.addPermanentWidget(self.server_label)
        bar.addPermanentWidget(self.memory_label)
        bar.addPermanentWidget(self.turn_label)
        self.model: ModelInfo | None = None
        self.free = 0

    def loading(self, text: str) -> None:
        self.model_label.setText(text)
        self.progress.show()

    def failed(self, text: str) -> None:
        self.model_label.setText("No model: " + text.split("\n")[0][:120])
        self.model_label.setToolTip(text)
        self.progress.hide()

    def ready(self, model: ModelInfo) -> None:
        self.model = model
        self.progress.hide()
        if model.remote:
            self.model_label.setText(f"{model.name} · {model.remote}")
            self.model_label.setToolTip(f"{model.name}, answered by the server at {model.remote}\n"
                                        f"connected in {model.load_seconds:.1f} s\n{model.auto_reason}")
            return
        split = f" · {model.gpu_layers}/{model.layers} layers on GPU" if model.split else ""
        self.model_label.setText(f"{model.name} · {model.device} · {model.dtype}{split}")
        tip = (f"{model.name}\nloaded in {model.load_seconds:.1f} s\ncontext: {model.context_length:,} tokens\n"
               f"precision: {model.precision_note or model.dtype}\n{model.exactness_note}")
        if model.weights:
            tip += f"\nweights: {model.weights}" + (f" ({model.weights_note})" if model.weights_note else "")
        if model.split:
            tip += f"\nlayers: {model.split}"
        if model.attention_note:
            tip += f"\nattention: {model.attention_note}"
        self.model_label.setToolTip(tip)

    def set_server(self, state: ServerState) -> None:
        """The local server started (its address and what it served, kept current by `refresh_server`)
        or stopped; an error stays on hover."""
        self.server = state
        if state.error:
            self.server_label.setText("Server off")
            self.server_label.setToolTip(f"The server for other apps is not running: {state.error}")
            self.server_label.show()
            return
        self.server_label.setVisible(state.running)
        self.refresh_server()

    def refresh_server(self) -> None:
        state, stats = self.server, self.server.stats
        if not state.running or stats is None:
            return
        served = stats.served
        host = state.url.removeprefix("http://").removesuffix("/v1")
        self.server_label.setText(f"Serving on {host} · {served:,} request{'s' if served != 1 else ''}")
        self.server_label.setToolTip(f"Other apps reach this model at {state.url} (OpenAI-compatible: "
                                     f"/chat/completions, /completions, /models).\nServed {served:,}, "
                                     f"stopped by their client {stats.cancelled:,}, turned away busy "
                                     f"{stats.rejected_busy:,}.")

    def refresh_memory(self, kv_bytes: int, warm_chats: int, ram_kv_bytes: int = 0, ram_chats: int = 0) -> int:
        """Update the memory meter; returns the free bytes it found on the model's device.

        With a GPU, the caches of idle chats moved to RAM are shown after the GPU's figures.
        """
        if self.model is None or self.model.remote:
            self.memory_label.setText("")
            return 0
        self.free = free_bytes(self.model.device)
        self.memory_label.setToolTip(self.memory_tip)
        on_gpu = self.model.on_gpu
        text = (f"{'VRAM' if on_gpu else 'RAM'}: weights {human_bytes(self.model.weights_bytes)} · "
                f"KV {human_bytes(kv_bytes)} ({warm_chats} chat{'s' if warm_chats != 1 else ''}) · "
                f"free {human_bytes(self.free)}")
        if on_gpu:
            text += (f"  |  RAM: KV {human_bytes(ram_kv_bytes)} ({ram_chats} idle chat{'s' if ram_chats != 1 else ''})"
                     f" · free {human_bytes(free_bytes('cpu'))}")
        self.memory_label.setText(text)
        return self.free

    def refresh_split_memory(self, gpu_kv: int, ready_chats: int, ram_kv: int, idle_chats: int) -> int:
        """The memory meter of a model split between GPU and CPU, each layer's KV where the layer runs: the GPU's
        weights and KV, then RAM's (the ready chats' layers in RAM and the idle chats moved there); returns the
        GPU's free bytes."""
        if self.model is None:
            return 0
        model = self.model
        self.free = free_bytes(model.gpu_device)
        idle = f", {idle_chats} idle chat{'s' if idle_chats != 1 else ''}" if idle_chats else ""
        self.memory_label.setText(
            f"VRAM: weights {human_bytes(model.gpu_weights_bytes)} · KV {human_bytes(gpu_kv)} ({ready_chats} "
            f"chat{'s' if ready_chats != 1 else ''}) · free {human_bytes(self.free)}  |  RAM: weights "
            f"{human_bytes(model.weights_bytes - model.gpu_weights_bytes)} · KV {human_bytes(ram_kv)}{idle} · "
            f"free {human_bytes(free_bytes('cpu'))}")
        self.memory_label.setToolTip(
            f"{self.memory_tip}.\n{model.split}: each layer keeps its KV cache where it runs, so a chat's cache is "
            "partly in VRAM and partly in RAM; idle chats' caches move to RAM whole, then to disk.")
        return self.free

    def turn(self, stats: dict[str, object] | None) -> None:
        """Show a reply's figures (TurnStats.to_dict() plus "restore", as stored with the reply)."""
        if not stats:
            self.turn_label.setText("")
            return
        self.turn_label.setText(
            f"Last reply: {stats.get('reused_tokens', 0):,} reused / {stats.get('prefilled_tokens', 0):,} prefilled"
            f" · TTFT {stats.get('ttft_ms', 0):,.0f} ms · {stats.get('decode_tok_s', 0):.1f} tok/s"
            + (f" · {float(str(stats['tokens_per_step'])):.1f} tok/step" if stats.get("speculative")
               and stats.get("tokens_per_step") else ""))
        restore = stored_restore(stats)
        # where the cache came from is told when the chat is opened; here only on hover
        self.turn_label.setToolTip(self.turn_tip + (f"\n{describe_restore(restore)}"
                                                    if restore is not None and restore.worth_telling else ""))


def stored_restore(stats: dict[str, object]) -> CacheRestored | None:
    """Where the cache of a reply's turn came from, as stored with the reply's figures."""
    restore = stats.get("restore")
    return CacheRestored.from_dict(0, restore) if isinstance(restore, dict) else None
