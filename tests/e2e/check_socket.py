"""Where the Python client looks for kvtierd, and the connector's warning when none listens there.

Run by tests/python_layout.rs with the vLLM venv; prints SOCKET OK."""

import logging
import os
import socket
import sys
import tempfile

from kvtier import client
from kvtier.vllm import common

runtime = tempfile.mkdtemp()
os.environ["XDG_RUNTIME_DIR"] = runtime
os.environ.pop("KVTIER_SOCKET", None)
own = os.path.join(runtime, "kvtier", "kvtierd.sock")
candidates = client.socket_candidates()
assert candidates[0] == own and client.SYSTEM_SOCKET in candidates, candidates
assert candidates[-1] == "/tmp/kvtier-0/kvtierd.sock", candidates

# This user's own daemon wins once it listens; $KVTIER_SOCKET wins over everything.
os.makedirs(os.path.dirname(own))
listener = socket.socket(socket.AF_UNIX)
listener.bind(own)
assert client.default_socket() == own, client.default_socket()
os.environ["KVTIER_SOCKET"] = "/elsewhere.sock"
assert client.default_socket() == "/elsewhere.sock"


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


records = Records()
common.logger.addHandler(records)
common.warn_if_no_daemon(own, explicit=False)
assert not records.messages, records.messages
missing = os.path.join(runtime, "nothing.sock")
common.warn_if_no_daemon(missing, explicit=True)
assert len(records.messages) == 1 and "WITHOUT the KV cache" in records.messages[0], records.messages
assert missing in records.messages[0], records.messages
print("SOCKET OK")
sys.stdout.flush()
