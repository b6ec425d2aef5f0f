"""``python -m flows.stages.prepare``: validate, split and decode data.source once."""

from __future__ import annotations

import logging

from flows.contracts.settings import Settings
from flows.core.params import Params
from flows.core.paths import PREPARED
from flows.stages.entry import finish, run_main

log = logging.getLogger("tunedeck")


def work(params: Params, settings: Settings) -> dict:
    """Run prepare with a progress bar; report rejected files on the console and in rejected.json."""
    from pathlib import Path

    from tqdm import tqdm

    from flows.core.images import list_class_folders
    from flows.core.prepare import prepare

    source = Path(params.data.source)
    total = sum(1 for f in list_class_folders(source) for p in f.rglob("*") if p.is_file() and not p.name.startswith("."))
    with tqdm(total=total, desc="prepare", unit="img", disable=None, leave=False) as bar:
        result = prepare(params, PREPARED, progress=bar.update)
    if result.rejected:
        log.warning("prepare: %d file(s) left out, listed in %s:", result.rejected, PREPARED / "rejected.json")
        import json

        for item in json.loads((PREPARED / "rejected.json").read_text())[:20]:
            log.warning("  %s: %s", item["path"], item["reason"])
    return {
        "data_version": result.data_version,
        "classes": len(result.classes),
        **{f"n_{k}": v for k, v in result.counts.items()},
        "rejected": result.rejected,
    }


if __name__ == "__main__":
    finish(run_main("prepare", work, warm=False))  # no torch here: nothing to gain from the warm server
