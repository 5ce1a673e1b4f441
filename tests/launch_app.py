"""The real app in its own process, with the tiny random model instead of a real one (tests only).

    python -m tests.launch_app [--send TEXT] [--hold-after N] [--model-fails MESSAGE] [app arguments]

Production code has no test hooks: this launcher injects the model loader (and an optional first
message, sent in a new chat once the window is up) through `app.__main__.main`'s parameters.

`--hold-after N` holds the reply open however fast the machine is: the tiny model runs N forward passes
(the prompt's, then one per token, speculation being off in the chat `--send` opens), then holds the next
one until a line comes on stdin; each line lets one more pass through, the line "open" all of them. The end
of stdin lets nothing go (a test that holds the reply kills the process).
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import replace
from typing import Any

from app.__main__ import main as app_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--send", metavar="TEXT", help="send TEXT in a new chat right after start")
    parser.add_argument("--hold-after", metavar="N", type=int,
                        help="hold the model after N forward passes; each line on stdin lets one more through")
    parser.add_argument("--model-fails", metavar="MESSAGE", help="the model load fails with MESSAGE")
    args, app_args = parser.parse_known_args(argv)

    def load() -> Any:
        from engine.models import ModelLoadError
        from tests.tiny import ForwardGate, tiny_loaded_model

        if args.model_fails:
            raise ModelLoadError(args.model_fails)
        lm = tiny_loaded_model()
        if args.hold_after is not None:
            gate = ForwardGate(timeout=None)  # held until the test says, or kills the process
            gate.hold_after(args.hold_after)
            threading.Thread(target=_release_from_stdin, args=(gate,), daemon=True,
                             name="launch-app-gate").start()
            gate.attach(lm)
        return lm

    def after_start(window: Any) -> None:
        if args.send:
            chat_id = window.new_chat()
            if chat_id is not None and args.hold_after is not None:  # one token per pass, so that N passes are N tokens
                window.store.set_settings(chat_id, replace(window.store.chat(chat_id).settings, speculative="off"))
            window.send(args.send)

    return app_main(app_args, loader=load, after_start=after_start)


def _release_from_stdin(gate: Any) -> None:
    for line in sys.stdin:
        if line.strip() == "open":
            gate.open()
        else:
            gate.step(1)


if __name__ == "__main__":
    sys.exit(main())
