"""kvtier: the Python client of kvtierd and its vLLM connector (`kvtier.vllm.KvTierConnector`)."""

from .client import Client, DaemonError, KvTierError, Namespace, Slot, default_socket

__all__ = ["Client", "DaemonError", "KvTierError", "Namespace", "Slot", "default_socket"]
