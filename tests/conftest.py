import os

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Seconds after which a test is named on the console: `-q` prints one dot per test, and the
#: multi-process tests take minutes each.
SLOW_SECONDS = float(os.environ.get("LONGSWAP_SLOW_TEST_SECONDS", "30"))
#: Where the durations of slow tests are kept between runs (pytest's cache).
SLOW_CACHE = "longswap/slow_tests"


class SlowTests:
    """Names each test that takes over SLOW_SECONDS (its fixtures' set-up included) when it
    finishes, and when it starts if it was that slow in an earlier run, so that a long
    silence has a name."""

    def __init__(self, config):
        self.plugins = config.pluginmanager
        self.cache = config.cache
        self.earlier = self.cache.get(SLOW_CACHE, {})
        self.took = {}

    def _say(self, text):
        reporter = self.plugins.get_plugin("terminalreporter")  # none without a terminal
        if reporter is not None:
            if reporter._tw.width_of_current_line:  # after `-q`'s dots
                reporter.write("\n")
            reporter.write_line(text)

    def pytest_runtest_logstart(self, nodeid):
        if nodeid in self.earlier:
            self._say(f"{nodeid}: running (took {self.earlier[nodeid]:.0f} s last time)")

    def pytest_runtest_logreport(self, report):
        self.took[report.nodeid] = self.took.get(report.nodeid, 0.0) + report.duration
        if report.when == "teardown" and self.took[report.nodeid] > SLOW_SECONDS:
            self._say(f"{report.nodeid}: {self.took[report.nodeid]:.0f} s")

    def pytest_sessionfinish(self):
        slow = {nodeid: s for nodeid, s in self.took.items() if s > SLOW_SECONDS}
        kept = {nodeid: s for nodeid, s in self.earlier.items() if nodeid not in self.took}
        self.cache.set(SLOW_CACHE, kept | slow)


def pytest_configure(config):
    if getattr(config, "cache", None) is not None:
        config.pluginmanager.register(SlowTests(config), "longswap-slow-tests")


#: The pattern of the :func:`swapped` embedded model.
SWAPPED_WINDOW = "sliding_window(window=32, sinks=4)"


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """The embedded model swapped to :data:`SWAPPED_WINDOW`, written by ``longswap swap``."""
    from longswap.cli import main
    from longswap.demo import EMBEDDED_MODEL

    out = tmp_path_factory.mktemp("swapped") / "swapped"
    flags = ["--model", str(EMBEDDED_MODEL), "--pattern", SWAPPED_WINDOW, "--out", str(out)]
    assert main(["swap", *flags]) == 0
    return out
