"""Light and dark themes: a Fusion palette, a style sheet from resources/, and the colours the
Markdown renderer needs. "system" follows `QStyleHints.colorScheme()` and its changes."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette

from engine.resources import resource_path


@dataclass(frozen=True)
class Theme:
    name: str  # "light" | "dark"
    window: str
    base: str
    text: str
    muted: str
    accent: str
    code_bg: str
    code_border: str
    inline_code_bg: str
    user_bubble: str
    assistant_bubble: str
    pygments_style: str

    @property
    def dark(self) -> bool:
        return self.name == "dark"


LIGHT = Theme("light", window="#f5f5f7", base="#ffffff", text="#1d1d1f", muted="#6e6e73", accent="#2f6fde",
              code_bg="#f3f4f6", code_border="#d9dce1", inline_code_bg="#eceef1", user_bubble="#e8f0fd",
              assistant_bubble="#ffffff", pygments_style="default")
DARK = Theme("dark", window="#1e1f22", base="#26282c", text="#e6e6e6", muted="#9a9ca1", accent="#6ea8ff",
             code_bg="#18191c", code_border="#3a3d42", inline_code_bg="#34373c", user_bubble="#2d3a52",
             assistant_bubble="#26282c", pygments_style="monokai")


def system_is_dark() -> bool:
    app = QGuiApplication.instance()
    if not isinstance(app, QGuiApplication):
        return False
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def resolve(choice: str) -> Theme:
    """`choice` is "system", "light" or "dark"."""
    if choice == "dark" or (choice == "system" and system_is_dark()):
        return DARK
    return LIGHT


def palette(theme: Theme) -> QPalette:
    p = QPalette()
    c = QColor
    window, base, text = c(theme.window), c(theme.base), c(theme.text)
    alternate = base.darker(104) if not theme.dark else base.lighter(112)
    button = c("#eceef1") if not theme.dark else c("#33363b")
    for group in (QPalette.ColorGroup.Active, QPalette.ColorGroup.Inactive):
        p.setColor(group, QPalette.ColorRole.Window, window)
        p.setColor(group, QPalette.ColorRole.WindowText, text)
        p.setColor(group, QPalette.ColorRole.Base, base)
        p.setColor(group, QPalette.ColorRole.AlternateBase, alternate)
        p.setColor(group, QPalette.ColorRole.Text, text)
        p.setColor(group, QPalette.ColorRole.Button, button)
        p.setColor(group, QPalette.ColorRole.ButtonText, text)
        p.setColor(group, QPalette.ColorRole.Highlight, c(theme.accent))
        p.setColor(group, QPalette.ColorRole.HighlightedText, c("#ffffff"))
        p.setColor(group, QPalette.ColorRole.Link, c(theme.accent))
        p.setColor(group, QPalette.ColorRole.ToolTipBase, base)
        p.setColor(group, QPalette.ColorRole.ToolTipText, text)
        p.setColor(group, QPalette.ColorRole.PlaceholderText, c(theme.muted))
        p.setColor(group, QPalette.ColorRole.Mid, c(theme.code_border))
    disabled = QPalette.ColorGroup.Disabled
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        p.setColor(disabled, role, c(theme.muted))
    p.setColor(disabled, QPalette.ColorRole.Window, window)
    p.setColor(disabled, QPalette.ColorRole.Base, window)
    p.setColor(disabled, QPalette.ColorRole.Button, button)
    return p


def style_sheet(theme: Theme) -> str:
    """resources/cachet.qss with the theme's colours filled in (`{accent}` and so on)."""
    template = resource_path("cachet.qss").read_text(encoding="utf-8")
    values = {k: getattr(theme, k) for k in theme.__dataclass_fields__ if k not in ("name", "pygments_style")}
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def apply(app: QGuiApplication, theme: Theme) -> None:
    from PySide6.QtWidgets import QApplication

    app.setPalette(palette(theme))
    if isinstance(app, QApplication):
        app.setStyleSheet(style_sheet(theme))
