"""The registry's GTO import leaves a process's logging alone.

A pipeline run hung for good at its first promotion, on a busy machine: importing gto ran gto's
`logging.config.dictConfig`, which flushed and closed every handler while holding logging's lock,
and Prefect's API log handler flushes by waiting on a worker thread that needed the same lock.
The stacks are in the closing note of 2026-12-07. This holds both halves, each in a fresh process:
a plain `import gto` flushes and closes a handler the process had (the cause, so the test would
notice a gto that stopped doing it), and flows.ship.registry.gto_api() touches it not at all.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import logging, sys
class Probe(logging.Handler):
    calls = []
    def emit(self, record): pass
    def flush(self): Probe.calls.append("flush")
    def close(self): Probe.calls.append("close"); super().close()
probe = Probe()
logging.getLogger().addHandler(probe)
{importer}
print(sorted(set(Probe.calls)), probe in logging.getLogger().handlers)
"""


def calls_after(importer: str) -> str:
    code = PROBE.format(importer=importer)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_gto_api_imports_gto_without_flushing_or_closing_the_processes_handlers():
    assert calls_after("import gto.api") == "['close', 'flush'] True", "the baseline: gto's own import resets logging"
    assert calls_after("from flows.ship.registry import gto_api; gto_api().register") == "[] True"
