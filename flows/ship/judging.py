"""`python -m flows.ship.judging`: the promotion gate on the model in the working directory, as a process of its own.

A pipeline run's gate scores its candidate and prod on the test split, which needs torch and timm. Run in the flow
run's own process it imported them there (about 4 s of CPU per run on a 2-core box, more than the rest of the flow
process's work); as this process it hands itself to the run's warm server (flows.stages.warm), where they are
imported already, as a stage does. Without a warm server it runs here, only slower. It writes promotion.json (and
MODEL_CARD.md when it promotes) and prints the verdict; flows.ship.gate.read_judgement reads it back.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.paths import PARAMS
from flows.stages import warm
from flows.stages.entry import finish


def main() -> int:
    """The gate on the working directory's model; 2 and one sentence on bad input."""
    try:
        settings = Settings.read()
        if (status := warm.hand_over(settings)) is not None:
            return status
        from flows.core.params import load_params
        from flows.ship.gate import judge

        judge(Path.cwd(), load_params(PARAMS), log=print)
    except TunedeckError as exc:
        print(f"promotion gate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    finish(main())
