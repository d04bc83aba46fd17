"""Qt-free observable stores of the desktop app."""
