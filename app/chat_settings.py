"""The per-chat settings panel: system prompt, sampling, and the KV cache strategy with what each
strategy would cost and how long a chat fits in the memory free now.

It edits a copy of the chat's settings; Apply hands the whole new ChatSettings to the window,
which applies what changed (a new cache strategy makes the worker rebuild the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.protocol import CacheState, ModelInfo
from app.texts import human_bytes, human_tokens
from engine.specs import (
    AUTO,
    BACKENDS,
    GROUP_SIZES,
    LOSSY,
    MIN_STATIC_CACHE_LEN,
    OVERFLOW_POLICIES,
    REPETITION_PENALTY_RANGE,
    SPECULATIVE_MODES,
    STRATEGIES,
    STRATEGY_FIELDS,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    CacheConfigError,
    CacheSpec,
    SamplingSettings,
)
from engine.store import ChatSettings

AUTO_TIP = ("“auto” lets Cachet's memory advisor pick the strategy for this machine's memory and the model's "
            "context, once the model is loaded.")
STRATEGY_TIPS = {
    "dynamic": "The full cache: every token's keys and values, exact. Grows with the chat.",
    "sink": "Attention sinks: keeps the first tokens and a recent window, evicts the middle. Bounded size, lossy.",
    "quantized": "Keys and values stored in 2 or 4 bits, recent tokens in full precision. Lossy.",
    "sink-quantized": "Attention sinks with quantized storage. Bounded and small, lossy.",
    "offloaded": "Keeps the cache in RAM and streams it to the GPU layer by layer.",
    "static": "Pre-allocates a fixed length (enables compiled decoding on GPUs).",
}
AXES: tuple[tuple[int | str, str], ...] = ((0, "per token"), (-1, "per channel"))
OVERFLOW_LABELS = {"stop": "Stop and tell me", "truncate-middle": "Truncate the middle",
                   "sink": "Continue with attention sinks"}
SPECULATIVE_LABELS = {"auto": "Automatic (when it pays on this machine)", "off": "Off (one token per step)",
                      "prompt-lookup": "Always guess from the conversation"}
SPECULATIVE_TIP = ("Speculative decoding guesses the next tokens from text already in the conversation (code "
                   "being edited, quoted passages, names) and checks several guesses in one step of the model. "
                   "Replies are the same either way (greedy: token for token); only their speed changes.")


@dataclass(frozen=True)
class Param:
    label: str
    tip: str
    choices: tuple[tuple[int | str, str], ...] = ()  # (value, label) pairs
    minimum: int = 0
    maximum: int = 10_000_000


PARAMS: dict[str, Param] = {
    "sink_tokens": Param("Sink tokens", "The first tokens, always kept: attention leans on them.", maximum=4096),
    "window": Param("Window", "How many recent tokens are kept.", minimum=2),
    "nbits": Param("Bits", "Bits per stored value.", choices=((2, "2"), (4, "4"))),
    "residual": Param("Full-precision tail", "The most recent tokens kept unquantized."),
    "q_group_size": Param("Group size", "Values quantized together share a scale.",
                          choices=tuple((g, str(g)) for g in GROUP_SIZES)),
    "axis_key": Param("Key axis", "Per-channel keys matter most at 2 bits (KIVI).", choices=AXES),
    "axis_value": Param("Value axis", "How values are grouped for quantization.", choices=AXES),
    "backend": Param("Backend", "The quantization library.", choices=tuple((b, b) for b in BACKENDS)),
    "max_cache_len": Param("Pre-allocated length", "Tokens the static cache reserves.", minimum=MIN_STATIC_CACHE_LEN),
}


def compact_combo() -> QComboBox:
    """A combo box that does not widen the panel to its longest entry."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


def human_size(n: int | None) -> str:
    return "—" if n is None else human_bytes(n)


class ChatSettingsPanel(QScrollArea):
    """Signals: apply_requested(int chat_id, ChatSettings)."""

    apply_requested = Signal(int, object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatSettings")
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.chat_id: int | None = None
        self.loaded: ChatSettings | None = None
        self.model: ModelInfo | None = None
        self.busy = ""
        self.free = 0
        self.reference_tokens = 0
        self._filling = False
        self._param_widgets: dict[str, tuple[QLabel, QWidget]] = {}

        body = QWidget()
        body.setObjectName("chatSettings")
        outer = QVBoxLayout(body)
        outer.setContentsMargins(10, 8, 10, 10)
        outer.setSpacing(10)
        self.status = QLabel()
        self.status.setObjectName("muted")
        self.status.setWordWrap(True)
        outer.addWidget(self.status)

        prompt_box = QGroupBox("System prompt")
        pl = QVBoxLayout(prompt_box)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Instructions the model reads before the chat (optional)")
        self.system_prompt.setFixedHeight(80)
        pl.addWidget(self.system_prompt)
        outer.addWidget(prompt_box)

        sampling_box = QGroupBox("Sampling")
        form = QFormLayout(sampling_box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.temperature = self._double(*TEMPERATURE_RANGE, 0.05, 2, "0 = greedy: always the most likely token")
        self.top_p = self._double(TOP_P_RANGE[0] + 0.01, TOP_P_RANGE[1], 0.01, 2,
                                  "Sample from the smallest set of tokens with this much "
                                                      "probability")
        self.top_k = self._int(0, 100_000, "Sample from the k most likely tokens (0 = off)")
        self.repetition_penalty = self._double(*REPETITION_PENALTY_RANGE, 0.05, 2,
                                               "Above 1 discourages repeating tokens")
        self.max_new_tokens = self._int(1, 1_000_000, "The longest reply, in tokens")
        self.seed = self._int(-1, 2**31 - 1, "A fixed seed repeats the same reply; “random” does not")
        self.seed.setSpecialValueText("random")
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Top-k", self.top_k)
        form.addRow("Repetition penalty", self.repetition_penalty)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Seed", self.seed)
        outer.addWidget(sampling_box)

        cache_box = QGroupBox("KV cache")
        cl = QVBoxLayout(cache_box)
        self.strategies = QTreeWidget()
        self.strategies.setRootIsDecorated(False)
        self.strategies.setColumnCount(3)
        self.strategies.setHeaderLabels(["Strategy", "Size", "Fits now"])
        self.strategies.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.strategies.setUniformRowHeights(True)
        self.strategies.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.strategies.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        header = self.strategies.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        cl.addWidget(self.strategies)
        self.estimate_note = QLabel()
        self.estimate_note.setObjectName("muted")
        self.estimate_note.setWordWrap(True)
        cl.addWidget(self.estimate_note)
        self.params_form = QFormLayout()
        self.params_form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        cl.addLayout(self.params_form)
        self.strategy_note = QLabel()
        self.strategy_note.setWordWrap(True)
        cl.addWidget(self.strategy_note)
        self.cache_now = QLabel()
        self.cache_now.setObjectName("muted")
        self.cache_now.setWordWrap(True)
        cl.addWidget(self.cache_now)
        self.overflow = compact_combo()
        self.overflow.setToolTip("What happens when this chat no longer fits the model's context")
        self.overflow.currentIndexChanged.connect(self._changed)
        overflow_label = QLabel("When the chat outgrows the model's context:")
        overflow_label.setWordWrap(True)
        cl.addWidget(overflow_label)
        cl.addWidget(self.overflow)
        self.speculative = compact_combo()
        self.speculative.setToolTip(SPECULATIVE_TIP)
        self.speculative.currentIndexChanged.connect(self._changed)
        speculative_label = QLabel("Speculative decoding:")
        speculative_label.setToolTip(SPECULATIVE_TIP)
        cl.addWidget(speculative_label)
        cl.addWidget(self.speculative)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(6)
        self.progress.hide()
        cl.addWidget(self.progress)
        outer.addWidget(cache_box)

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.revert_button = QPushButton("Revert")
        self.apply_button = QPushButton("Apply")
        self.apply_button.setObjectName("sendButton")
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.apply_button)
        outer.addLayout(buttons)
        outer.addStretch(1)
        self.setWidget(body)

        self.revert_button.clicked.connect(self._revert)
        self.apply_button.clicked.connect(self._apply)
        self.system_prompt.textChanged.connect(self._changed)
        for spin in (self.temperature, self.top_p, self.repetition_penalty, self.top_k, self.max_new_tokens,
                     self.seed):
            spin.valueChanged.connect(self._changed)
        self.strategies.currentItemChanged.connect(self._strategy_changed)
        self._filling = True
        self._build_choices()
        self._filling = False
        self._set_enabled()

    # ----- building ------------------------------------------------------------------------------
    @staticmethod
    def _double(lo: float, hi: float, step: float, decimals: int, tip: str) -> QDoubleSpinBox:
        w = QDoubleSpinBox()
        w.setRange(lo, hi)
        w.setSingleStep(step)
        w.setDecimals(decimals)
        w.setToolTip(tip)
        return w

    @staticmethod
    def _int(lo: int, hi: int, tip: str) -> QSpinBox:
        w = QSpinBox()
        w.setRange(lo, hi)
        w.setToolTip(tip)
        w.setGroupSeparatorShown(True)
        return w

    def _build_choices(self) -> None:
        """The strategy list, the overflow policies and a widget per cache setting (engine/specs.py)."""
        for name in (AUTO, *STRATEGIES):
            item = QTreeWidgetItem([name, "", ""])
            item.setData(0, Qt.ItemDataRole.UserRole, name)
            item.setToolTip(0, AUTO_TIP if name == AUTO else STRATEGY_TIPS[name])
            self.strategies.addTopLevelItem(item)
        rows = self.strategies.topLevelItemCount()
        self.strategies.setFixedHeight(self.strategies.header().sizeHint().height()
                                       + rows * self.strategies.sizeHintForRow(0) + 6)
        for policy in OVERFLOW_POLICIES:
            self.overflow.addItem(OVERFLOW_LABELS[policy], policy)
        for mode in SPECULATIVE_MODES:
            if mode in SPECULATIVE_LABELS:  # "draft-model" needs a draft model, which the window cannot load yet
                self.speculative.addItem(SPECULATIVE_LABELS[mode], mode)
        for name in STRATEGY_FIELDS["sink-quantized"] + STRATEGY_FIELDS["static"]:
            label, widget = self._param_widget(name)
            self.params_form.addRow(label, widget)
            self._param_widgets[name] = (label, widget)

    def set_model(self, model: ModelInfo | None) -> None:
        """Say what this model allows on this machine: what auto means, what is not available and why."""
        self.model = model
        for item in self._strategy_items():
            name = str(item.data(0, Qt.ItemDataRole.UserRole))
            reason = model.availability.get(name) if model is not None and name != AUTO else None
            item.setDisabled(bool(reason))
            tip = (model.auto_reason if model is not None else AUTO_TIP) if name == AUTO else STRATEGY_TIPS[name]
            for col in range(3):
                item.setToolTip(col, f"Not available: {reason}" if reason else tip if col == 0 else "")
        backend = self._param_widgets["backend"][1]
        assert isinstance(backend, QComboBox)
        for index in range(backend.count()):
            reason = model.backend_availability.get(str(backend.itemData(index))) if model is not None else None
            item = backend.model().item(index)  # type: ignore[attr-defined]
            item.setEnabled(not reason)
            item.setToolTip(f"Not available: {reason}" if reason else "")
        if self.chat_id is not None and self.loaded is not None:
            self._fill(self.loaded)
        self._set_enabled()

    def _strategy_items(self) -> list[QTreeWidgetItem]:
        items = (self.strategies.topLevelItem(i) for i in range(self.strategies.topLevelItemCount()))
        return [item for item in items if item is not None]

    def _param_widget(self, name: str) -> tuple[QLabel, QWidget]:
        meta = PARAMS[name]
        widget: QWidget
        if meta.choices:
            combo = compact_combo()
            for value, text in meta.choices:
                combo.addItem(text, value)
            combo.currentIndexChanged.connect(self._changed)
            widget = combo
        else:
            spin = QSpinBox()
            spin.setRange(meta.minimum, meta.maximum)
            spin.setGroupSeparatorShown(True)
            spin.valueChanged.connect(self._changed)
            widget = spin
        widget.setToolTip(meta.tip)
        label = QLabel(meta.label)
        label.setToolTip(meta.tip)
        return label, widget

    # ----- showing a chat ------------------------------------------------------------------------------
    def show_chat(self, chat_id: int | None, settings: ChatSettings | None, busy: str = "",
                  cache: CacheState | None = None) -> None:
        same = chat_id == self.chat_id and settings == self.loaded
        self.chat_id, self.busy = chat_id, busy
        if not same:
            self.loaded = settings
            if settings is not None:
                self._fill(settings)
        self.progress.setVisible(busy == "rebuilding")
        if cache is not None and cache.where == "disk":
            tokens = f" ({cache.tokens:,} tokens)" if cache.tokens else ""
            self.cache_now.setText(f"This chat's cache is saved on disk{tokens}; opening the chat restores it.")
        elif cache is not None and cache.where != "none":
            place = {"gpu": "on the GPU", "ram": "in RAM"}.get(cache.where, cache.where)
            self.cache_now.setText(f"This chat's cache now: {cache.tokens:,} tokens, {human_size(cache.bytes)} "
                                   f"({cache.strategy}), {place}.")
            self.reference_tokens = cache.tokens
        elif self.model is not None and self.model.remote:
            self.cache_now.setText("")
        else:
            self.cache_now.setText("This chat has no cache in memory; the next message builds it.")
        self.cache_now.setVisible(bool(self.cache_now.text()))
        self._set_enabled()

    def _fill(self, s: ChatSettings) -> None:
        self._filling = True
        sampling = s.sampling
        self.system_prompt.setPlainText(s.system_prompt)
        self.temperature.setValue(float(sampling.temperature))
        self.top_p.setValue(float(sampling.top_p))
        self.top_k.setValue(int(sampling.top_k))
        self.repetition_penalty.setValue(float(sampling.repetition_penalty))
        self.max_new_tokens.setValue(int(sampling.max_new_tokens))
        self.seed.setValue(-1 if sampling.seed is None else int(sampling.seed))
        self.overflow.setCurrentIndex(max(self.overflow.findData(s.overflow), 0))
        self.speculative.setCurrentIndex(max(self.speculative.findData(s.speculative), 0))
        for item in self._strategy_items():
            if item.data(0, Qt.ItemDataRole.UserRole) == s.cache.strategy:
                self.strategies.setCurrentItem(item)
        for name, (_label, widget) in self._param_widgets.items():
            value = getattr(s.cache, name)
            if isinstance(widget, QSpinBox):
                widget.setValue(int(value))
            elif isinstance(widget, QComboBox):
                widget.setCurrentIndex(max(widget.findData(value), 0))
        self._filling = False
        self._update_params()
        self.refresh_estimates()

    def collect(self) -> ChatSettings:
        """The settings as the panel shows them now (not validated: the engine says what cannot work)."""
        seed = self.seed.value()
        sampling = SamplingSettings(
            temperature=round(self.temperature.value(), 4), top_p=round(self.top_p.value(), 4),
            top_k=self.top_k.value(), repetition_penalty=round(self.repetition_penalty.value(), 4),
            max_new_tokens=self.max_new_tokens.value(), seed=None if seed < 0 else seed)
        values: dict[str, int | str] = {}
        for name, (_label, widget) in self._param_widgets.items():
            if isinstance(widget, QSpinBox):
                values[name] = widget.value()
            elif isinstance(widget, QComboBox):
                values[name] = widget.currentData()
        base = self.loaded.cache if self.loaded is not None else CacheSpec(AUTO)
        cache = replace(base, strategy=self.current_strategy(), **values)  # type: ignore[arg-type]
        overflow = self.overflow.currentData() or (self.loaded.overflow if self.loaded else "stop")
        speculative = self.speculative.currentData() or (self.loaded.speculative if self.loaded else "auto")
        return ChatSettings(system_prompt=self.system_prompt.toPlainText().strip(), sampling=sampling, cache=cache,
                            overflow=str(overflow), speculative=str(speculative))

    def current_strategy(self) -> str:
        item = self.strategies.currentItem()
        if item is None and self.loaded is not None:
            return self.loaded.cache.strategy
        return str(item.data(0, Qt.ItemDataRole.UserRole)) if item is not None else AUTO

    def select_strategy(self, name: str) -> None:
        for item in self._strategy_items():
            if item.data(0, Qt.ItemDataRole.UserRole) == name:
                self.strategies.setCurrentItem(item)
                return
        raise KeyError(name)

    def param_widget(self, name: str) -> QWidget:
        return self._param_widgets[name][1]

    def dirty(self) -> bool:
        return self.loaded is not None and self.collect() != self.loaded

    # ----- reacting ------------------------------------------------------------------------------------
    def _strategy_changed(self) -> None:
        self._update_params()
        self._changed()

    def _update_params(self) -> None:
        strategy = self.current_strategy()
        used = STRATEGY_FIELDS.get(strategy, ())  # auto: the advisor sets them
        for name, (label, widget) in self._param_widgets.items():
            label.setVisible(name in used)
            widget.setVisible(name in used)
        notes = []
        effective = strategy
        if self.model is not None and self.model.remote:
            notes.append(f"{self.model.auto_reason} Cachet keeps no cache for this chat; the server reports what "
                         "it reused (“reused” in the reply's figures).")
        elif strategy == AUTO and self.model is not None:
            effective = self.model.auto_cache.strategy
            notes.append(f"auto → {effective} on this machine (Cachet's memory advisor).")
        if effective in LOSSY and not (self.model is not None and self.model.remote):
            notes.append("⚠ Lossy: this strategy changes what the model remembers of the chat; replies can "
                         "differ from the full cache.")
            if self.model is not None:  # the engine (and torch) is loaded by then, never at start-up
                notes.append(self._measured_cost(effective))
        self.strategy_note.setText(" ".join(notes))
        self.strategy_note.setVisible(bool(notes))

    def _measured_cost(self, strategy: str) -> str:
        """The accuracy cost scripts/measure_fidelity.py measured for exactly these settings."""
        from engine.caches.fidelity import WARN_ABOVE, measured_cost

        try:
            spec = replace(self.collect().cache, strategy=strategy).validate()
        except CacheConfigError:
            return ""
        cost = measured_cost(spec)
        if cost is None:
            return "Its accuracy cost was not measured for these exact settings."
        text = f"Measured on the bundled model: {cost.describe()}."
        if cost.warn:
            text = f"⚠ {text} That is more than {WARN_ABOVE:.0%}: expect noticeably worse replies."
        return text

    def _changed(self) -> None:
        if self._filling:
            return
        self._update_params()
        self.refresh_estimates()
        self._set_enabled()

    def set_free_memory(self, free: int) -> None:
        if abs(free - self.free) > 16 * 1024 * 1024:
            self.free = free
            self.refresh_estimates()

    def refresh_estimates(self) -> None:
        model = self.model
        if model is None or model.remote:  # a remote server's memory is its own
            self.estimate_note.setText("")
            for item in self._strategy_items():
                item.setText(1, "—")
                item.setText(2, "—")
            return
        from engine.service import estimate  # the engine is loaded by the time a model is

        tokens = model.context_length
        base = self.collect().cache
        for item in self._strategy_items():
            est = estimate(replace(base, strategy=str(item.data(0, Qt.ItemDataRole.UserRole))), tokens, model,
                           self.free)
            if est.error:
                item.setText(1, "—")
                item.setText(2, "—")
                if not item.isDisabled():
                    item.setToolTip(1, f"No estimate: {est.error}")
            else:
                item.setText(1, human_size(est.bytes_at))
                item.setText(2, human_tokens(est.tokens_fit))
        self.estimate_note.setText(
            f"Size: the cache at the model's full context ({tokens:,} tokens). Fits now: the longest chat whose "
            f"cache fits in the {human_size(self.free)} free at the moment.")

    def _set_enabled(self) -> None:
        ready = self.chat_id is not None
        editors: list[QWidget] = [self.system_prompt, self.temperature, self.top_p, self.top_k,
                                  self.repetition_penalty, self.max_new_tokens, self.seed, self.strategies,
                                  self.overflow, self.speculative]
        params = [w for _label, w in self._param_widgets.values()]
        # a remote server chooses its own cache, overflow handling and decoding: only sampling goes with a request
        remote = self.model is not None and self.model.remote
        local_only = [self.strategies, self.overflow, self.speculative, *params]
        for widget in editors + params:
            widget.setEnabled(ready and not (remote and widget in local_only))
        dirty = ready and self.dirty()
        self.apply_button.setEnabled(dirty and not self.busy)
        self.revert_button.setEnabled(dirty)
        if self.chat_id is None:
            self.status.setText("No chat selected.")
        elif self.busy == "rebuilding":
            self.status.setText("Rebuilding this chat's cache…")
        elif self.busy:
            self.status.setText("A reply is being written; changes can be applied when it ends.")
        else:
            self.status.setText("Changes apply to this chat from its next message.")

    def _revert(self) -> None:
        if self.loaded is not None:
            self._fill(self.loaded)
        self._set_enabled()

    def _apply(self) -> None:
        if self.chat_id is None or self.loaded is None:
            return
        new = self.collect()
        self.loaded = new
        self.apply_requested.emit(self.chat_id, new)
        self._set_enabled()
