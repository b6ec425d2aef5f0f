"""The suite's own rules (tests/ci_guard.py): under CI a skip fails the run; a shuffle's seed repeats its order."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

# the inner runs load the guard alone (the snapshot plugin would clear the outer run's temp folder)
PLUGINS = ("-p", "tests.ci_guard", "-p", "no:textual-snapshot")
SUITE = '''
import pytest

from tests.conftest import ROOT

def test_runs():
    pass

def test_skips():
    pytest.skip("needs a thing this machine lacks")

@pytest.fixture
def missing():
    pytest.skip("a fixture found nothing")

def test_skips_in_its_fixture(missing):
    pass

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA GPU")

@pytest.mark.xfail(reason="a known fault")
def test_expected_to_fail():
    assert False
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    return pytester


def test_under_ci_a_skipped_test_fails_the_run_and_says_why(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest(*PLUGINS, "-rA")
    # a skip in a fixture becomes an error, in the test a failure; the gpu test is the one skip allowed
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    assert result.ret != 0
    for reason in ("needs a thing this machine lacks", "a fixture found nothing"):
        result.stdout.fnmatch_lines([f"*skipped under CI ({reason})*"])


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_off_ci_a_skip_is_still_a_skip(suite, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    result = suite.runpytest(*PLUGINS)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0


def test_a_shuffle_prints_its_seed_and_the_seed_repeats_the_order(pytester: pytest.Pytester, monkeypatch):
    for module in "abcde":
        pytester.makepyfile(**{f"test_{module}": "\n".join(f"def test_{module}{i}(): pass" for i in range(6))})
    monkeypatch.delenv("CI", raising=False)

    def order(setting: str) -> tuple[str, list[str]]:
        monkeypatch.setenv("TUNEDECK_TEST_ORDER", setting)
        result = pytester.runpytest(*PLUGINS, "-v")
        seed = re.search(r"TUNEDECK_TEST_ORDER=shuffle:(\d+)", result.stdout.str()).group(1)
        return seed, [line.split()[0] for line in result.stdout.lines if " PASSED" in line]

    seed, first = order("shuffle")
    assert order(f"shuffle:{seed}") == (seed, first)
    modules = [name.split("::")[0] for name in first]
    assert len(first) == 30 and all(modules.count(m) == 6 for m in set(modules))
    assert modules == sorted(modules, key=modules.index), "a module's tests stay together"
    assert order("shuffle:1")[1] != order("shuffle:2")[1]  # 30 tests: two seeds giving one order is 1 in 10^7
    monkeypatch.setenv("TUNEDECK_TEST_ORDER", f"shuffle:{seed}")
    alone = pytester.runpytest(*PLUGINS, "-v", "test_c.py")
    ran_alone = [line.split()[0] for line in alone.stdout.lines if " PASSED" in line]
    assert ran_alone == [name for name in first if name.startswith("test_c.py")], "a module alone keeps its order"


def test_the_seed_is_on_the_first_line_even_when_quiet(pytester: pytest.Pytester, monkeypatch):
    pytester.makepyfile(test_one="def test_one(): pass")
    monkeypatch.setenv("TUNEDECK_TEST_ORDER", "shuffle:42")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest(*PLUGINS, "-q")
    assert result.stdout.lines[0] == ("test order: shuffled, TUNEDECK_TEST_ORDER=shuffle:42 repeats it; "
                                      "CI is set: a skipped test fails the run")


def test_two_xdist_workers_shuffle_with_one_seed_and_a_skip_still_fails_under_ci(pytester: pytest.Pytester, monkeypatch):
    """`make test` runs two workers: each shuffles with the controller's seed (each module's tests in the
    order one process gives that seed), and a skip on a worker still fails the run."""
    for module in "abcd":
        pytester.makepyfile(**{f"test_{module}": "\n".join(f"def test_{module}{i}(): pass" for i in range(8))})
    pytester.makepyfile(test_skip="import pytest\ndef test_skips():\n    pytest.skip('nothing here')")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("TUNEDECK_TEST_ORDER", "shuffle:7")
    monkeypatch.setenv("CI", "true")

    def per_module(*args: str) -> tuple[pytest.RunResult, dict[str, list[str]]]:
        result = pytester.runpytest_subprocess(*PLUGINS, "-v", *args)
        ran = [m.group(1) for line in result.stdout.lines if (m := re.search(r"(test_\w+\.py::\w+)", line))
               and ("PASSED" in line or "FAILED" in line)]
        modules: dict[str, list[str]] = {}
        for name in dict.fromkeys(ran):
            modules.setdefault(name.split("::")[0], []).append(name)
        return result, modules

    one, alone = per_module()
    two, workers = per_module("-n", "2", "--dist", "loadfile")
    two.assert_outcomes(passed=32, failed=1)
    two.stdout.fnmatch_lines(["*skipped under CI (nothing here)*"])
    assert workers == alone and alone["test_a.py"] != sorted(alone["test_a.py"]), (alone, workers)
