"""Rank 0 drives a policy through `open_policy` (every rank's, as the trainer service does); the other ranks
`follow`. For tests/trainer/test_rank_failures.py:

    torchrun --nproc-per-node 2 -m tests.utils.leader_driver OUT CONFIG.json go-on   # failures the ranks survive
    OPD_FAILPOINT=forward:1 torchrun ... go-on                                       # one they cannot

go-on: opens the policy (with OPD_FAILPOINT=open:R the first open fails on rank R), loads a state from an empty
folder (every rank fails alike), writes a version where rank 0 cannot (rank 0 alone fails, after the
collective), trains one step, closes, exits. OUT/outcomes.json: what each call did, in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opd.trainer import distributed, ranks
from opd.trainer.config import RunConfig
from tests.utils.fsdp_driver import samples_of


def main() -> None:
    out, config_file, scenario = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    assert scenario == "go-on", scenario
    group = distributed.init()
    assert group is not None, "run under torchrun"
    if not group.leader:
        ranks.follow(group)
        return
    config = RunConfig.model_validate_json(config_file.read_text())
    outcomes: list[dict] = []

    def attempt(what: str, call) -> object:
        try:
            result = call()
        except Exception as exc:
            outcomes.append({"call": what, "error": type(exc).__name__, "message": str(exc)})
            return None
        outcomes.append({"call": what, "ok": True})
        return result

    policy = attempt("open", lambda: ranks.open_policy(config)) or attempt("open", lambda: ranks.open_policy(config))
    empty = out / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    attempt("load_state", lambda: policy.load_state(empty))
    (out / "a-file").write_text("")
    attempt("save_version", lambda: policy.save_version(out / "a-file" / "version"))
    record = attempt("train", lambda: policy.train(samples_of(1, min(len(policy.tokenizer), 400))))
    outcomes[-1]["loss"] = record["loss"] if record else None
    attempt("close", policy.close)
    (out / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main()
