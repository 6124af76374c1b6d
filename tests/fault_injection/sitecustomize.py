"""Fault injection for the crash tests (test-only; the shard writer carries no hook of its own).

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one; the crash
tests put this folder on ``PYTHONPATH`` of the `histotx shard run` they start, so it reaches that process
and the sharding workers it starts (forkserver children start a fresh interpreter with the same
environment). With ``HISTOTX_FAULT_AFTER_TILES=N`` a process SIGKILLs itself right after writing its N-th
tile to a shard (flushed, before the shard may be closed), as a power cut or the OOM killer would.
With ``HISTOTX_FAULT_ENOSPC_AFTER_TILES=N`` writing its N-th tile fails instead as on a full disk (OSError
ENOSPC naming the shard file), for machines where a small tmpfs cannot be mounted
(tests/test_cli_exit_codes.py).
"""

import errno
import os
import signal

_KILL_AFTER = int(os.environ.get("HISTOTX_FAULT_AFTER_TILES", "0") or 0)
_ENOSPC_AT = int(os.environ.get("HISTOTX_FAULT_ENOSPC_AFTER_TILES", "0") or 0)

if _KILL_AFTER > 0 or _ENOSPC_AT > 0:
    from histotx.sharding import writer

    _write_members = writer.ShardSink._write_members
    _tiles = 0

    def _write_members_with_faults(self, members):
        global _tiles
        _tiles += 1
        if 0 < _ENOSPC_AT <= _tiles:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp))
        _write_members(self, members)
        if _tiles == _KILL_AFTER:
            self._fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    writer.ShardSink._write_members = _write_members_with_faults
