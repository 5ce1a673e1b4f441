"""Cachet's Qt shell: windows, widgets and the worker bridge. No tensor code lives here."""
