"""The engine thread alone runs torch multi-threaded; helper threads started after it use one."""

from __future__ import annotations

import threading

import torch

from app.engine.cpu.threads import _libgomp, become_engine_thread, confine_to_one_thread


def _in_thread(fn) -> object:  # type: ignore[no-untyped-def]
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def test_engine_thread_keeps_its_count_and_later_threads_get_one() -> None:
    previous = torch.get_num_threads()
    try:
        def engine() -> tuple[int, object, int]:
            mine = become_engine_thread(2)
            helper = _in_thread(torch.get_num_threads)  # a thread started by the engine thread
            return mine, helper, torch.get_num_threads()

        mine, helper, after = _in_thread(engine)  # type: ignore[misc]
        assert mine == 2 and after == 2
        if _libgomp() is not None:  # the per-thread setting needs torch's own libgomp
            assert helper == 1
            assert _in_thread(torch.get_num_threads) == 1  # and so does any later thread
    finally:
        torch.set_num_threads(previous)


def test_confined_thread_runs_one_thread() -> None:
    previous = torch.get_num_threads()
    try:
        def confined() -> int:
            confine_to_one_thread()
            return torch.get_num_threads()

        assert _in_thread(confined) == 1
    finally:
        torch.set_num_threads(previous)
