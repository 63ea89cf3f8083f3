"""Ring point-to-point exchange: send to the next rank, receive from the previous one, overlapped.

Usage per ring step (ring-flash-attention's RingComm, with misuse checks)::

    comm.send_recv(k_now, k_next); comm.send_recv(v_now, v_next)
    comm.commit()            # dist.batch_isend_irecv: NCCL starts now, on its own stream
    ... launch the local kernel on k_now / v_now ...
    comm.wait()              # the current stream waits for the exchange (host does not block on NCCL)

What is sent is the tensor being computed on (no send copy); receive buffers are preallocated
by the caller (``RingBuffers``). Peers are GLOBAL ranks, so a ring may be any subset of a group
(the ranks of one dilated segment) without creating a new process group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ringplan_runtime import _compat


class RingComm:
    """Send/receive one step of a ring over ``ranks`` (global ranks, in ring order)."""

    def __init__(self, ranks: Sequence[int], *, group=None, rank: int | None = None) -> None:
        self.ranks = [int(r) for r in ranks]
        me = dist.get_rank() if rank is None else rank
        if me not in self.ranks:
            raise ValueError(f"rank {me} is not in the ring {self.ranks}")
        self.index = self.ranks.index(me)
        self.size = len(self.ranks)
        self.next_rank = self.ranks[(self.index + 1) % self.size]
        self.prev_rank = self.ranks[(self.index - 1) % self.size]
        self.group = group
        self._ops: list[dist.P2POp] = []
        self._requests: list | None = None

    def send_recv(self, to_send: torch.Tensor, recv_buffer: torch.Tensor, *, tag: int = 0) -> torch.Tensor:
        """Queue: send ``to_send`` to the next rank, receive the previous rank's into ``recv_buffer``."""
        if self._requests is not None:
            raise RuntimeError("send_recv after commit: wait() for the exchange in flight first")
        if self.size == 1:
            raise RuntimeError("a ring of one rank has nobody to exchange with")
        if to_send.shape != recv_buffer.shape or to_send.dtype != recv_buffer.dtype:
            raise ValueError(f"send {tuple(to_send.shape)} {to_send.dtype} and receive buffer "
                             f"{tuple(recv_buffer.shape)} {recv_buffer.dtype} differ")
        if not (to_send.is_contiguous() and recv_buffer.is_contiguous()):
            raise ValueError("ring exchange needs contiguous send and receive tensors")
        if recv_buffer.data_ptr() == to_send.data_ptr():
            raise ValueError("the receive buffer is the tensor being sent")
        self._ops.append(_compat.p2p_op(dist.isend, to_send, self.next_rank, self.group, tag))
        self._ops.append(_compat.p2p_op(dist.irecv, recv_buffer, self.prev_rank, self.group, tag))
        return recv_buffer

    def commit(self) -> None:
        """Start every queued send/receive as one batch."""
        if self._requests is not None:
            raise RuntimeError("commit called twice without wait()")
        if not self._ops:
            raise RuntimeError("commit with nothing queued: call send_recv first")
        self._requests = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        """Wait for the committed exchange (on CUDA: make the current stream wait for it)."""
        if self._requests is None:
            raise RuntimeError("wait without a committed exchange")
        for request in self._requests:
            request.wait()
        self._requests = None

    @property
    def in_flight(self) -> bool:
        return self._requests is not None


class RingBuffers:
    """Preallocated receive buffers shaped like ``templates``, used in turn.

    ``count`` sets of buffers: the runtime memory plan (docs/CONTRACTS.md) uses 0 for a ring of
    one, 1 for a ring of two, 2 for three or more (the set computed on + the set arriving).
    """

    def __init__(self, templates: Sequence[torch.Tensor], count: int, *, dtype: torch.dtype | None = None) -> None:
        if count < 0:
            raise ValueError(f"buffer count must be >= 0, got {count}")
        self._sets = [[torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device) for t in templates]
                      for _ in range(count)]
        self._turn = 0

    def next_set(self) -> list[torch.Tensor]:
        """The next set of buffers (alternating when there are two)."""
        if not self._sets:
            raise RuntimeError("no receive buffers were allocated for this ring")
        buffers = self._sets[self._turn % len(self._sets)]
        self._turn += 1
        return buffers

    def release(self) -> None:
        """Drop the buffers (their memory returns to the allocator)."""
        self._sets = []


def kv_buffer_count(ring_size: int) -> int:
    """Receive buffer sets the forward needs: 0 (P = 1), 1 (P = 2), 2 (P >= 3). Docs: CONTRACTS.md."""
    return min(2, ring_size - 1)
