"""Live migration of a running VM to another process or host.

==================  ==========================================================================
``stream``          the wire format: versioned, checksummed records, every length and page
                    index checked before it reaches guest memory
``precopy``         :func:`send_vm` (pre-copy passes while the vCPUs run, a paused final pass
                    and the machine state) and :func:`receive_vm` (a new VM from the stream)
==================  ==========================================================================

This package sits above the snapshot layer (machine state, layouts, the change log) and the
dirty-rate limit, and below the guests.
"""

from kvmio.errors import MigrationError, MigrationInDoubtError
from kvmio.migration.precopy import (
    DEFAULT_DOWNTIME,
    MigrationReport,
    PassReport,
    ReceivedVm,
    forget_hand_over,
    receive_vm,
    send_vm,
)
from kvmio.migration.stream import StreamReader, StreamWriter, socket_pair

__all__ = [
    "DEFAULT_DOWNTIME",
    "MigrationError",
    "MigrationInDoubtError",
    "MigrationReport",
    "PassReport",
    "ReceivedVm",
    "StreamReader",
    "StreamWriter",
    "forget_hand_over",
    "receive_vm",
    "send_vm",
    "socket_pair",
]
