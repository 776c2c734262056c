"""The CPU thread policy for inference (issue 16): explicit choices win, then the cores left free.

Pure logic on given facts (usable cores, measured busy cores, torch's default, the environment);
the speed it buys is measured by bench/bench_busy_cpu.py, not here.
"""

import os

import pytest
import torch

from glassgpt.cli import main
from glassgpt.device import (
    BUSY_CORE,
    busy_cores,
    choose_threads,
    configure_cpu_threads,
    cpu_times,
    usable_cores,
)


def choose(requested=None, usable=2, busy=0.0, default=2, environ=None):
    return choose_threads(requested, usable=usable, busy=busy, default=default, environ=environ or {})


def test_quiet_machine_uses_every_usable_core():
    assert choose(busy=0.0) == 2
    assert choose(busy=0.05, usable=8, default=8) == 8


def test_a_busy_core_is_left_to_the_process_using_it():
    assert choose(busy=1.0) == 1  # the case: one busy loop on a 2-core machine
    assert choose(busy=1.0, usable=8, default=8) == 7
    assert choose(busy=3.4, usable=8, default=8) == 4  # 3 full cores and a 40%-busy one


def test_never_fewer_than_one_thread():
    assert choose(busy=2.0) == 1
    assert choose(busy=5.0, usable=4, default=4) == 1


def test_a_partly_busy_core_counts_from_the_threshold():
    assert choose(busy=BUSY_CORE - 0.01) == 2
    assert choose(busy=BUSY_CORE + 0.01) == 1
    assert choose(busy=1 + BUSY_CORE - 0.01, usable=4, default=4) == 3
    assert choose(busy=1 + BUSY_CORE + 0.01, usable=4, default=4) == 2


def test_affinity_and_torchs_default_both_cap_the_count():
    # a process pinned to 4 cores of a 64-core machine, where torch counted the host's cores
    assert choose(usable=4, default=32) == 4
    # hyperthreads: torch picks the physical cores, fewer than the affinity mask's logical ones
    assert choose(usable=16, default=8) == 8
    assert choose(usable=16, default=8, busy=9.0) == 7


def test_without_a_measurement_the_usable_cores_are_used():
    assert choose(busy=None, usable=4, default=4) == 4
    assert choose(busy=None, usable=2, default=8) == 2


def test_explicit_threads_win_over_everything():
    assert choose(requested=2, busy=2.0) == 2  # even on a busy machine
    assert choose(requested=6, usable=2, default=2) == 6  # even beyond the cores: the user's call
    assert choose(requested=3, environ={"OMP_NUM_THREADS": "1"}) == 3


def test_users_omp_num_threads_leaves_torchs_choice():
    assert choose(busy=1.0, environ={"OMP_NUM_THREADS": "2"}) is None
    assert choose(busy=1.0, environ={"OMP_NUM_THREADS": ""}) == 1  # set but empty: not a choice


def test_bad_thread_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        choose(requested=0)
    with pytest.raises(ValueError, match="at least 1"):
        choose(requested=-2)


STAT = """cpu  1000 0 500 8000 100 0 0 0 0 0
cpu0 100 0 100 700 100 0 0 0 0 0
cpu1 900 0 400 7300 0 0 0 0 0 0
cpu2 10 0 10 60 0 0 0 20 5 0
intr 12345 1 2 3
ctxt 999
"""


def test_cpu_times_reads_the_given_cores_only():
    # idle = idle + iowait; total = user..steal (guest is already inside user)
    assert cpu_times(STAT, {0}) == (800.0, 1000.0)
    assert cpu_times(STAT, {0, 1}) == (800.0 + 7300.0, 1000.0 + 8600.0)
    assert cpu_times(STAT, {2}) == (60.0, 100.0)  # stolen time counts as busy
    assert cpu_times(STAT, {7}) is None


def test_busy_cores_measures_within_the_usable_range():
    busy = busy_cores(0.02)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= len(os.sched_getaffinity(0))


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_configure_sets_torchs_thread_count(keep_threads):
    assert configure_cpu_threads(3) == 3
    assert torch.get_num_threads() == 3
    if "OMP_NUM_THREADS" not in os.environ:  # then torch's choice stands, untouched
        assert 1 <= configure_cpu_threads() <= usable_cores()


def test_generate_refuses_zero_threads_before_loading(tmp_path, capsys):
    from glassgpt.model import GPT
    from glassgpt.tokenizer import get_tokenizer
    from glassgpt.weights import save_model

    save_model(GPT.from_preset("nano", vocab_size=50257), tmp_path, get_tokenizer("gpt2"))
    assert main(["generate", "Hello", "--model", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("requested, expected", [(None, 1), (2, 2)])
def test_training_follows_the_same_policy(keep_threads, monkeypatch, requested, expected):
    """Training, like decoding, leaves a core that another process keeps busy (the demo ran at 5.44
    s/step with 2 threads beside a busy process, 2.34 with 1); --threads still wins."""
    from glassgpt import device
    from glassgpt.train import Trainer, recipe

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "busy_cores", lambda seconds=0.1: 1.0)  # one core taken by someone else
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    Trainer(recipe("tinygpt", max_steps=1, threads=requested))
    assert torch.get_num_threads() == expected
