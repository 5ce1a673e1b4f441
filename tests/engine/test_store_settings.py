"""Every field of a chat's settings survives every path that copies them (issue 23 §7 item 1): the
dict form, the repair of untrusted settings, the database row, a reopened database, and an export
imported again. `ChatSettings.repaired` once rebuilt the settings without `speculative` (and the
database had no column for it), so a chat set to "off" silently went back to "auto".

The fields are read from the dataclasses themselves, so a field added later is covered without
editing this test; a field of a type this test cannot vary fails loudly instead of passing unchecked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from engine import specs
from engine.store import ChatSettings, ChatStore


def _choices(default: Any) -> list[Any]:
    """Other values of the option tuples of engine.specs that hold `default` (strategies, policies, modes...)."""
    found: list[Any] = []
    for value in vars(specs).values():
        if isinstance(value, tuple | frozenset) and default in value:
            found += [v for v in value if v != default and type(v) is type(default) and v not in found]
    if default == specs.AUTO or default in specs.STRATEGIES:
        found += [s for s in (specs.AUTO, *specs.STRATEGIES) if s != default and s not in found]
    return found


def _candidates(default: Any) -> list[Any]:
    """Values other than `default` a field of its type may hold, the likeliest to be valid first."""
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, str):
        return [*_choices(default), "A non-default text: ünïcode ✓"]
    if isinstance(default, int):
        return [*_choices(default), default + 1, default * 2, default - 1, 1, 0, 32]
    if isinstance(default, float):
        return [default / 2, default + 0.05, default - 0.05, 1.0, 0.5]
    if default is None:
        return [1234, 0.5, "text"]
    return []


def _valid(settings: ChatSettings) -> bool:
    _, problems = ChatSettings.repaired(settings.to_dict())
    try:
        settings.sampling.validate()
        settings.cache.validate()
        specs.validate_overflow(settings.overflow)
        specs.validate_speculative(settings.speculative)
    except ValueError:
        return False
    return not problems


def _one_field_changed() -> Iterator[tuple[str, ChatSettings]]:
    """For each leaf field of ChatSettings (nested settings field by field): default settings with only
    that field set to a valid non-default value."""
    base = ChatSettings()
    for top in fields(ChatSettings):
        value = getattr(base, top.name)
        if is_dataclass(value):
            for inner in fields(value):
                default = getattr(value, inner.name)
                changed = next((s for c in _candidates(default) if _valid(
                    s := replace(base, **{top.name: replace(value, **{inner.name: c})}))), None)
                assert changed is not None, f"no valid non-default value found for {top.name}.{inner.name}"
                yield f"{top.name}.{inner.name}", changed
        else:
            changed = next((s for c in _candidates(value) if _valid(s := replace(base, **{top.name: c}))), None)
            assert changed is not None, f"no valid non-default value found for {top.name}"
            yield top.name, changed


CASES = list(_one_field_changed())


def test_every_field_is_varied() -> None:
    """The test below sees every field ChatSettings has now (and will have), nested ones included."""
    names = {name for name, _ in CASES}
    assert {"speculative", "overflow", "system_prompt", "sampling.temperature", "cache.strategy"} <= names
    assert all(settings != ChatSettings() for _, settings in CASES)


@pytest.mark.parametrize("settings", [s for _, s in CASES], ids=[n for n, _ in CASES])
def test_each_setting_survives_every_copy_path(settings: ChatSettings, tmp_path: Path) -> None:
    assert ChatSettings.from_dict(settings.to_dict()) == settings
    assert ChatSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert ChatSettings.repaired(settings.to_dict()) == (settings, [])

    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    created = store.create_chat(settings)
    assert store.chat(created.id).settings == settings
    other = store.create_chat()
    store.set_settings(other.id, settings)
    assert store.chat(other.id).settings == settings
    store.add_message(created.id, "user", "hi")
    exported = json.loads(json.dumps(store.export_json(created.id)))
    imported = store.import_chat(exported)
    assert imported.repaired == ()
    assert imported.chat.settings == settings and store.chat(imported.chat.id).settings == settings
    store.close()

    reopened = ChatStore(path)
    assert [c.settings for c in reopened.chats()] == [settings] * 3
    reopened.close()


def test_a_speculative_mode_that_cannot_work_is_reset_with_a_sentence() -> None:
    settings, problems = ChatSettings.repaired({**ChatSettings().to_dict(), "speculative": "telepathy"})
    assert settings.speculative == "auto"
    assert len(problems) == 1 and "telepathy" in problems[0]
