"""OpenCV for the data path, safe to fork.

OpenCV's pthreads thread pool does not survive ``fork()`` (opencv/opencv#5150): once a process has run a
parallel OpenCV call, its pool threads sleep on condition variables, and a forked child that touches the pool
(``cv2.setNumThreads``, or any parallel call) waits for threads that do not exist in it, forever. A
DataLoader worker forked after the trainer rendered views itself (a probe, ``num_workers=0``, a test) hung
so. Before each fork the pool is shrunk to the calling thread (which joins its threads), and the parent gets
its setting back afterwards; the child keeps one thread, as a loader worker should.
"""

from __future__ import annotations

import os

import cv2

_saved_threads: list[int] = []


def _before_fork() -> None:
    _saved_threads.append(cv2.getNumThreads())
    cv2.setNumThreads(1)


def _after_fork_in_parent() -> None:
    cv2.setNumThreads(_saved_threads.pop())


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)

__all__ = ["cv2"]
