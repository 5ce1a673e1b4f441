"""The app's global settings: one typed, validated file, written atomically."""

from __future__ import annotations

from pathlib import Path


def test_app_config_round_trips_and_rejects_bad_values(tmp_path: Path) -> None:
    import pytest

    from app.config import AppConfig, ConfigError, load_config, save_config

    path = tmp_path / "settings.json"
    config = AppConfig(model="/models/x.gguf", device="cuda:1", dtype="bfloat16", kv_budget_mb=2048, theme="dark",
                       default_sampling={"temperature": 0.2})
    save_config(config, path)
    assert load_config(path) == config
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file and os.replace
    with pytest.raises(ConfigError):
        config.with_changes(device="gpu")
    with pytest.raises(ConfigError):
        config.with_changes(kv_budget_mb=-1)
    # the RAM and disk budgets for idle chats' caches: automatic (None) or megabytes
    assert (AppConfig().ram_budget_mb, AppConfig().disk_budget_mb) == (None, 4096)
    budgets = config.with_changes(ram_budget_mb=512, disk_budget_mb=0)
    save_config(budgets, path)
    assert load_config(path) == budgets
    for bad in ({"ram_budget_mb": -5}, {"disk_budget_mb": -1}, {"disk_budget_mb": "lots"}, {"ram_budget_mb": 1.5}):
        with pytest.raises(ConfigError):
            config.with_changes(**bad)
    path.write_text('{"theme": "purple", "dtype": "float16", "unknown": 1}')
    assert load_config(path) == AppConfig(dtype="float16")  # a bad value falls back to its default
    path.write_text("not json")
    assert load_config(path) == AppConfig()
