"""The frozen app's entry point (packaging/cachet.spec): the same `main()` as the `cachet` command."""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the app's folder may be read-only, and it is never written to

from app.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
