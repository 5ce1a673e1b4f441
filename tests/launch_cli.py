"""The terminal chat in its own process, with the tiny random model instead of a real one (tests only).

    python -m tests.launch_cli [--hold-at N] chat [engine chat arguments]

Production code has no test hooks: this launcher injects the model loader through `engine.cli.main`'s
`loader` parameter, as tests/launch_app.py does for the app. With `--hold-at N` the first reply is held
open at its N-th generated token (the model's N-th one-token forward pass of that turn waits) until
the turn's stop event is set, which is what Ctrl+C does; the launcher says HELD on stderr when the hold
begins. A test can so stop a reply that is certainly still being written, however fast the machine.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

HELD = "[test: the reply is held open]"
HOLD_LIMIT_S = 120.0  # a hold nobody ends fails the turn instead of hanging the test


def hold_reply(model: Any, at: int, stops: list[threading.Event]) -> None:
    """Make `model` wait at its `at`-th one-token forward pass once a turn has started (`stops` holds each
    turn's stop event, newest last) until that turn's stop event is set."""
    forward = model.forward
    seen = 0

    def held_forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        ids = kwargs.get("input_ids", args[0] if args else None)
        if stops and ids is not None and ids.shape[-1] == 1:
            seen += 1
            if seen == at:
                print(HELD, file=sys.stderr, flush=True)
                stop, deadline = stops[-1], time.monotonic() + HOLD_LIMIT_S
                # Poll the flag rather than wait on the event: the chat's SIGINT handler sets it on this very
                # thread, and it would wait forever for the lock an interrupted `stop.wait()` holds.
                while not stop.is_set():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the held reply was not stopped within {HOLD_LIMIT_S:.0f} s")
                    time.sleep(0.005)
        return forward(*args, **kwargs)

    model.forward = held_forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False, allow_abbrev=False)
    parser.add_argument("--hold-at", type=int, default=None, metavar="N",
                        help="hold the first reply open at its N-th token until Ctrl+C")
    args, chat_args = parser.parse_known_args(argv)

    from engine import cli
    from engine.service import ChatService

    stops: list[threading.Event] = []
    if args.hold_at is not None:
        run_turn = ChatService.run_turn

        def recording_run_turn(self: ChatService, *a: Any, stop: threading.Event | None = None, **k: Any) -> Any:
            if stop is not None:
                stops.append(stop)
            return run_turn(self, *a, stop=stop, **k)

        ChatService.run_turn = recording_run_turn  # type: ignore[method-assign]

    def load() -> Any:
        from tests.tiny import tiny_loaded_model

        lm = tiny_loaded_model()
        if args.hold_at is not None:
            hold_reply(lm.model, args.hold_at, stops)
        return lm

    return cli.main(chat_args, loader=load)


if __name__ == "__main__":
    sys.exit(main())
