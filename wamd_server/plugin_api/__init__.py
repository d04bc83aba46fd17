"""The plugin contract: hook specifications, the marker for implementations, and the plugin host."""

import pluggy

hookimpl = pluggy.HookimplMarker("wamd")

__all__ = ["hookimpl"]
