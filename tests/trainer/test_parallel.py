"""parallel.py's parts that need no process group: the work split and the device check (the FSDP2 side runs in
test_distributed.py, on 2 processes)."""

from __future__ import annotations

import pytest

from opd.trainer.config import ConfigError
from opd.trainer.parallel import OneProcess, check_device, shares


def test_shares_deal_the_longest_first_to_the_least_loaded_rank() -> None:
    lengths = [5, 40, 7, 30, 12, 1]
    split = shares(lengths, 2)
    assert split == [[1, 2, 5], [0, 3, 4]]  # 40+7+1 against 30+12+5
    assert sorted(i for share in split for i in share) == list(range(len(lengths)))
    assert shares([3, 3], 4) == [[0], [1], [], []], "a rank may get nothing: it runs stand-in passes"


def test_one_process_trains_on_everything_in_its_own_micro_batches() -> None:
    one = OneProcess()
    assert one.share([4, 2, 9]) == [0, 1, 2] and one.micro_batches(3) == 3 and one.gather("x") == ["x"]
    assert one.leader and one.world == 1 and one.checkpoint_group is None


@pytest.mark.parametrize("wanted", ["auto", "cpu"])
def test_a_cpu_rank_takes_auto_or_cpu(wanted: str) -> None:
    check_device(wanted, "cpu")


def test_student_device_must_match_the_ranks_devices() -> None:
    check_device("cuda", "cuda:1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        check_device("cpu", "cuda:0")  # a CPU trainer on a GPU host: hide the GPUs
    with pytest.raises(ConfigError, match="no GPU is visible"):
        check_device("cuda", "cpu")
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        check_device("cuda:3", "cuda:0")
