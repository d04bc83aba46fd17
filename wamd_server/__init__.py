"""wamd server: API, device workers, planners and the simulated WhatsApp network."""

__version__ = "0.1.0"
