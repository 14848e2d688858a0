"""fedse: federated self-evolution of LLM agents (Fed-SE, arXiv 2512.08870)."""

__version__ = "0.1.0"
