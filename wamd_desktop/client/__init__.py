"""Qt-free REST and WebSocket client of the wamd server (imports only wamd_server.protocol)."""
