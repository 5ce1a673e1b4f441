"""The real app in its own process, with the tiny random model instead of a real one (tests only).

    python -m tests.launch_app [--send TEXT] [--model-fails MESSAGE] [app arguments]

Production code has no test hooks: this launcher injects the model loader (and an optional first
message, sent in a new chat once the window is up) through `app.__main__.main`'s parameters.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from app.__main__ import main as app_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--send", metavar="TEXT", help="send TEXT in a new chat right after start")
    parser.add_argument("--model-fails", metavar="MESSAGE", help="the model load fails with MESSAGE")
    args, app_args = parser.parse_known_args(argv)

    def load() -> Any:
        from engine.models import ModelLoadError
        from tests.tiny import tiny_loaded_model

        if args.model_fails:
            raise ModelLoadError(args.model_fails)
        return tiny_loaded_model()

    def after_start(window: Any) -> None:
        if args.send:
            window.new_chat()
            window.send(args.send)

    return app_main(app_args, loader=load, after_start=after_start)


if __name__ == "__main__":
    sys.exit(main())
