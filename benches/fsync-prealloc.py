#!/usr/bin/env python3
"""What a durable append costs on the disk under /tmp, by how the file's space was reserved.

N writes of SIZE bytes, each followed by fdatasync, three ways: appended to a growing file
(what segment files do today), appended into space reserved past the end with
fallocate(FALLOC_FL_KEEP_SIZE), and written at their position into space reserved with
posix_fallocate (the file's size already covers it). Prints p50 and p99 in microseconds.
Usage: benches/fsync-prealloc.py [N] [SIZE] [ROUNDS]
"""
import ctypes
import os
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 200
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def run(mode):
    d = tempfile.mkdtemp(prefix="fsync-prealloc.", dir="/tmp")
    path = os.path.join(d, "f")
    appending = mode in ("grow", "keep-size")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_APPEND if appending else 0), 0o600)
    try:
        span = N * SIZE + 4096
        if mode == "keep-size":
            if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(span)):
                raise OSError(ctypes.get_errno(), "fallocate")
            os.fsync(fd)
        elif mode == "reserved":
            os.posix_fallocate(fd, 0, span)
            os.fsync(fd)
        buf = os.urandom(SIZE)
        lat = []
        for i in range(N):
            t = time.perf_counter()
            if appending:
                os.write(fd, buf)
            else:
                os.pwrite(fd, buf, i * SIZE)
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
        os.rmdir(d)
    lat.sort()
    return round(lat[N // 2]), round(lat[min(N - 1, int(N * 0.99))])


for r in range(ROUNDS):
    print(f"round {r + 1}: " + ", ".join(
        f"{m} p50 {p50} µs p99 {p99} µs"
        for m in ("grow", "keep-size", "reserved")
        for p50, p99 in [run(m)]
    ))
