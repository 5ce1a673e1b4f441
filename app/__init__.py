"""Cachet's Qt shell: windows, widgets, and the worker that runs the engine service off the GUI thread. No tensor
code and no engine policy live here."""
