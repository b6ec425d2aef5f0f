"""Two rules of the suite's proof, as a pytest plugin (tests/conftest.py loads it).

- Under CI (the `CI` variable set, as `.ci/run` does) a skipped test is a failure: a proof that did
  not run must not pass. A developer's machine may still skip, and `-rs` prints why.
  Only tests marked `gpu` may skip (they need a CUDA GPU; `make test` deselects them).
- TUNEDECK_TEST_ORDER=shuffle[:SEED] runs the modules in a random order, and the tests within each:
  no test may depend on another having run first. The seed is chosen once, printed in the header
  and at the end, and TUNEDECK_TEST_ORDER=shuffle:SEED repeats the order. Under pytest-xdist every
  worker shuffles with the same seed, and `--dist loadfile` keeps each module on one worker.
  The modules with a slow test go first, longest first by tests/module_seconds.json, each one's seconds
  jittered by the seed (x 0.75 to 1.33, so pairings differ from run to run), then the rest: a long module taken last
  would leave the other worker idle for its length (93 s of a 1,117 s run, seed 68195, before this). The summary
  writes every module's seconds to .tunedeck/test-module-seconds.json: copy it over tests/module_seconds.json to
  refresh the weights (they order the modules; no test reads them).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

ORDER_SEED = pytest.StashKey[int | None]()
SEED_KEY = "tunedeck_order_seed"
WEIGHTS = Path(__file__).with_name("module_seconds.json")
SPANS = pytest.StashKey[dict]()  # xdist worker -> module -> [first start, last stop], from the reports


def under_ci() -> bool:
    """Whether this run is CI's: the `CI` variable set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    """Choose the shuffle's seed once, before anything is printed; an xdist worker takes its controller's."""
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        config.stash[ORDER_SEED] = worker.get(SEED_KEY)
        return
    order = os.environ.get("TUNEDECK_TEST_ORDER", "")
    seed = None
    if order.startswith("shuffle"):
        seed = int(order.partition(":")[2] or random.SystemRandom().randrange(100_000))
    config.stash[ORDER_SEED] = seed


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Every xdist worker shuffles with the controller's seed: they must collect the same order."""
    node.workerinput[SEED_KEY] = node.config.stash.get(ORDER_SEED, None)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The order and, under CI, the skip rule, at the top of the output (`-q` hides pytest's own header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    seed = session.config.stash.get(ORDER_SEED, None)
    order = f"shuffled, TUNEDECK_TEST_ORDER=shuffle:{seed} repeats it" if seed is not None else "as written"
    reporter.write_line(f"test order: {order}" + ("; CI is set: a skipped test fails the run" if under_ci() else ""))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Shuffle modules, and the tests within each; modules stay whole so a module's server starts once."""
    seed = config.stash.get(ORDER_SEED, None)
    if seed is None:
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    names = list(modules)
    random.Random(seed).shuffle(names)
    if getattr(config, "workerinput", None) is not None:
        # under xdist each idle worker takes the next module, so one long module taken last leaves the other
        # worker idle for its length: the modules with a slow test go first, the longest first (jittered by the
        # seed), the short ones fill the end; modules of no known length keep their shuffled order (a stable sort)
        slow = {name for name, tests in modules.items() if any(t.get_closest_marker("slow") for t in tests)}
        seconds = json.loads(WEIGHTS.read_text()) if WEIGHTS.is_file() else {}
        jitter = {name: random.Random(f"{seed}:weight:{name}").uniform(0.75, 1.33) for name in names}
        names.sort(key=lambda name: (0 if name in slow else 1, -seconds.get(name, 0) * jitter[name]))
    for name in names:  # a module's own order depends on the seed and its name only: run alone, it repeats
        random.Random(f"{seed}:{name}").shuffle(modules[name])
    items[:] = [item for name in names for item in modules[name]]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI, turn a skip (in setup or in the test) into a failure that says why it skipped."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and under_ci()) or hasattr(report, "wasxfail") or item.get_closest_marker("gpu"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI ({reason}): a test that does not run proves nothing; "
                       "make .ci/run install what it needs")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Under xdist, when each worker ran each module (the controller sees every worker's reports)."""
    worker = getattr(getattr(report, "node", None), "gateway", None)
    if worker is None or not hasattr(report, "start"):
        return
    spans = report.node.config.stash.setdefault(SPANS, {}).setdefault(worker.id, {})
    span = spans.setdefault(report.nodeid.split("::")[0], [report.start, report.stop])
    span[0], span[1] = min(span[0], report.start), max(span[1], report.stop)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The seed again at the end, where a failure is read; under xdist, where each worker's time went: its
    longest modules and how long it sat idle at the end while the other finished (the suite's 20-minute bound)."""
    spans = config.stash.get(SPANS, {})
    if len(spans) > 1:
        every = {name: round(stop - start) for modules in spans.values() for name, (start, stop) in modules.items()}
        with_time = Path(str(config.rootpath)) / ".tunedeck" / "test-module-seconds.json"
        with_time.parent.mkdir(exist_ok=True)
        with_time.write_text(json.dumps(dict(sorted(every.items())), indent=1) + "\n")
        end = max(stop for modules in spans.values() for _, stop in modules.values())
        for worker, modules in sorted(spans.items()):
            busy = sorted(((stop - start, name) for name, (start, stop) in modules.items()), reverse=True)
            last = max(stop for _, stop in modules.values())
            top = ", ".join(f"{name.removeprefix('tests/')} {seconds:.0f} s" for seconds, name in busy[:6])
            terminalreporter.write_line(f"{worker}: {len(modules)} modules, {sum(s for s, _ in busy):.0f} s in them, "
                                        f"idle for the last {end - last:.0f} s; longest: {top}")
    seed = config.stash.get(ORDER_SEED, None)
    if seed is not None:
        terminalreporter.write_line(f"tests ran shuffled: TUNEDECK_TEST_ORDER=shuffle:{seed} repeats this order")
