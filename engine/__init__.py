"""Cachet's generation engine: models, per-conversation KV caches, sessions. No Qt here, ever."""
