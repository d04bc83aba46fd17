"""`wamd-desktop` entry point. The desktop app is not built yet; say so plainly instead of failing obscurely."""

from __future__ import annotations

import sys


def main() -> None:
    sys.stderr.write(
        "wamd-desktop: the desktop app is not available in this version yet; "
        "use the server's REST and WebSocket API (see README.md)\n"
    )
    sys.exit(1)


if __name__ == "__main__":
    main()
