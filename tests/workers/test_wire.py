"""vnpd.workers.wire: every protocol message, through a socketpair and a spawned process.

The arrays that come back must equal the ones sent in dtype, shape and bytes, be
writable, and share no memory with the sender's or with another message's. Frames that
are cut off or malformed raise FrameError; two threads sending behind the worker's
channel lock deliver whole messages.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle
import socket
import struct
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vnpd.compute.packing import build_batch
from vnpd.workers.process import _Channel
from vnpd.workers.protocol import (BatchMsg, ErrorMsg, HeartbeatMsg, PingMsg, ReadyMsg,
                                   ResultMsg, StopMsg, WorkerSpec)
from vnpd.workers.wire import (MAGIC, SOCKET_BUFFER_BYTES, FrameError, recv_message,
                               send_message, widen)

RNG = np.random.default_rng(7)


def _residues(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def messages() -> list[Any]:
    """One of every message type, and ResultMsgs over the dtypes and shapes that matter."""
    spec = WorkerSpec(0, "cpu", "/m.pt", "float32", 33, 1022, 0, 5.0, "json", "info",
                      env={"A": "1"}, faults={"r1": "crash"}, layers=(6, 12),
                      residues="float16")
    batch = build_batch(np.array([4, 9]), ["MKV", "ACDEFG"], ids=("a", "b"))
    counts = np.array([5, 3], dtype=np.int64)
    return [
        spec, BatchMsg(3, batch), PingMsg(12.5), StopMsg(),
        ReadyMsg(11, "cpu", 320, 6, "sdpa", 4096, 1.5, (6,)),
        HeartbeatMsg(11, 2.0, 4, 3, 1.0, 12.5), HeartbeatMsg(11, 2.0, 0, None, None),
        ErrorMsg("oom", "out of memory", 3, "Traceback ..."),
        ResultMsg(3, _residues((2, 320), "float32"), 1.0, 2.0),
        ResultMsg(4, _residues((2, 320), "float32"), 1.0, 2.0,
                  _residues((8, 320), "float16"), counts),
        ResultMsg(5, _residues((2, 2, 64), "float32"), 1.0, 2.0,           # 3-D: layers
                  _residues((8, 2, 64), "float32"), counts),
        ResultMsg(6, np.zeros((0, 320), np.float32), 1.0, 2.0,             # zero-length
                  np.zeros((0, 320), np.float16), np.zeros(0, np.int64)),
        ResultMsg(7, np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],  # non-contiguous
                  1.0, 2.0, np.arange(60, dtype=np.uint8).reshape(5, 12).T,
                  np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))),
    ]


def assert_same(got: Any, sent: Any, path: str = "msg") -> None:
    """Equal in type and value; arrays equal in dtype, shape and bytes, writable, and not
    the sender's memory."""
    assert type(got) is type(sent), f"{path}: {type(got)} != {type(sent)}"
    if isinstance(sent, np.ndarray):
        assert got.dtype == sent.dtype and got.shape == sent.shape, path
        assert np.array_equal(got, sent), path
        assert got.flags.writeable, f"{path} not writable"
        assert not np.shares_memory(got, sent), f"{path} shares the sender's memory"
    elif dataclasses.is_dataclass(sent):
        for f in dataclasses.fields(sent):
            assert_same(getattr(got, f.name), getattr(sent, f.name), f"{path}.{f.name}")
    else:
        assert got == sent, f"{path}: {got!r} != {sent!r}"


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    a, b = socket.socketpair()
    left, right = Connection(a.detach()), Connection(b.detach())
    yield left, right
    left.close()
    right.close()


def _echo(conn: Connection) -> None:
    """The spawned peer: widen its end, send back every message until None."""
    widen(conn)
    while (msg := recv_message(conn)) is not None:
        send_message(conn, msg)


@pytest.mark.parametrize("index", range(len(messages())))
def test_round_trip_through_a_socketpair(pair: tuple[Connection, Connection],
                                         index: int) -> None:
    left, right = pair
    sent = messages()[index]
    send_message(left, sent)
    assert_same(recv_message(right), sent)


def test_round_trip_through_a_spawned_process() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_echo, args=(child,), daemon=True)
    process.start()
    child.close()
    widen(parent)
    sent = messages() + [ResultMsg(9, _residues((4, 2560), "float32"), 1.0, 2.0,
                                   _residues((3000, 2560), "float16"),  # 15 MB, > socket buffer
                                   np.array([1000, 2000], dtype=np.int64))]
    try:
        for msg in sent:
            send_message(parent, msg)
            assert_same(recv_message(parent), msg)
        send_message(parent, None)
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0


def test_arrays_of_two_messages_share_no_memory(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    rows = _residues((16, 64), "float16")
    send_message(left, ResultMsg(1, rows, 0.0, 0.0))
    send_message(left, ResultMsg(2, rows, 0.0, 0.0))
    first, second = recv_message(right), recv_message(right)
    first.embeddings[:] = 0
    assert np.array_equal(second.embeddings, rows)
    assert not np.shares_memory(first.embeddings, second.embeddings)


def test_a_message_without_arrays_is_one_send(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    send_message(left, HeartbeatMsg(1, 2.0, 3, None, None))
    header = right.recv_bytes()
    assert header[:4] == MAGIC and struct.unpack_from("<I", header, 4)[0] == 0
    assert not right.poll(0.1)


def test_a_frame_cut_off_before_its_buffers_raises(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    rows = _residues((4, 64), "float32")
    left.send_bytes(MAGIC + struct.pack("<IQQ", 2, rows.nbytes, rows.nbytes) + b"x")
    left.send_bytes(memoryview(rows).cast("B"))
    left.close()
    with pytest.raises(FrameError, match="cut off in buffer 2 of 2: end of file after 0 of 4"):
        recv_message(right)


def test_a_frame_cut_off_inside_a_buffer_raises(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    left.send_bytes(MAGIC + struct.pack("<IQ", 1, 1000) + b"x")
    os.write(left.fileno(), struct.pack("!i", 1000) + bytes(600))  # send_bytes's prefix
    left.close()
    with pytest.raises(FrameError, match="buffer 1 of 1: end of file after 600 of 1000"):
        recv_message(right)


def test_a_buffer_with_the_long_length_prefix_is_read(
        pair: tuple[Connection, Connection]) -> None:
    """send_bytes prefixes a buffer over 2 GiB with -1 then a "!Q" size: read it too."""
    left, right = pair
    rows = np.arange(6, dtype=np.int64)
    inband = pickle.dumps(rows, protocol=5, buffer_callback=lambda b: None)
    left.send_bytes(MAGIC + struct.pack("<IQ", 1, rows.nbytes) + inband)
    os.write(left.fileno(), struct.pack("!iQ", -1, rows.nbytes) + rows.tobytes())
    assert_same(recv_message(right), rows)


@pytest.mark.parametrize("header, match", [
    (b"VN", "header of 2 bytes"),
    (b"XXXX" + struct.pack("<I", 0), "starts with"),
    (MAGIC + struct.pack("<I", 3) + struct.pack("<Q", 8), "announces 3 buffers"),
    (MAGIC + struct.pack("<I", 0) + b"not a pickle", "does not unpickle"),
])
def test_a_malformed_header_raises(pair: tuple[Connection, Connection], header: bytes,
                                   match: str) -> None:
    left, right = pair
    left.send_bytes(header)
    with pytest.raises(FrameError, match=match):
        recv_message(right)


@pytest.mark.parametrize("announced, sent", [(8, 16), (16, 8)])
def test_a_buffer_of_the_wrong_size_raises(pair: tuple[Connection, Connection],
                                           announced: int, sent: int) -> None:
    left, right = pair
    left.send_bytes(MAGIC + struct.pack("<IQ", 1, announced) + b"x")
    left.send_bytes(bytes(sent))
    with pytest.raises(FrameError, match=f"holds {sent} bytes, announced {announced}"):
        recv_message(right)


@pytest.mark.timeout(120)
def test_two_threads_behind_the_channel_lock_send_whole_messages(
        pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    channel = _Channel(left)
    per_thread = 40

    def sender(tag: int) -> None:
        for i in range(per_thread):
            # Large enough that one frame takes several socket writes.
            rows = np.full((300, 640), tag * 1000 + i, dtype=np.float32)
            channel.send(ResultMsg(tag * 1000 + i, rows, 0.0, 0.0, rows[:, :10].copy()))

    threads = [threading.Thread(target=sender, args=(tag,), daemon=True) for tag in (1, 2)]
    for t in threads:
        t.start()
    got = []
    for _ in range(2 * per_thread):
        assert right.poll(30), "no frame in 30 s: the senders are stuck"
        got.append(recv_message(right))
    for t in threads:
        t.join(30)
    for msg in got:
        assert (msg.embeddings == msg.batch_id).all() and (msg.residues == msg.batch_id).all()
    for tag in (1, 2):
        assert [m.batch_id for m in got if m.batch_id // 1000 == tag] == \
            [tag * 1000 + i for i in range(per_thread)]


def _buffer_size(conn: Connection, option: int) -> int:
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, option)


def test_widen_raises_the_socket_buffers_up_to_the_kernel_cap(
        pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
    widen(left)
    # Linux doubles what it is asked for (bookkeeping), within the cap.
    assert _buffer_size(left, socket.SO_SNDBUF) >= 2 * min(SOCKET_BUFFER_BYTES, cap)
    send_message(left, PingMsg(1.0))  # the connection is still open
    assert_same(recv_message(right), PingMsg(1.0))


def test_widen_leaves_a_connection_that_is_not_a_socket_alone() -> None:
    read_fd, write_fd = os.pipe()
    reader, writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    widen(writer)
    send_message(writer, PingMsg(2.0))
    assert_same(recv_message(reader), PingMsg(2.0))
    reader.close()
    writer.close()


def test_token_batch_arrays_travel_out_of_band(pair: tuple[Connection, Connection]) -> None:
    left, right = pair
    batch = build_batch(np.arange(50), ["M" * 400] * 50)
    send_message(left, BatchMsg(1, batch))
    header = right.recv_bytes()
    count = struct.unpack_from("<I", header, 4)[0]
    sizes = struct.unpack_from(f"<{count}Q", header, 8)
    assert batch.tokens.nbytes in sizes and len(header) < batch.tokens.nbytes
