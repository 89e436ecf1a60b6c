"""Suite-wide test settings.

* Hypothesis: a ``ci`` profile (no deadline: a 2-core CI machine stalls now
  and then; derandomized so a CI failure replays locally) is loaded when
  ``CI=true``; ``HYPOTHESIS_PROFILE`` picks another.
* End-to-end tests (marked ``e2e``) need root, ``/dev/net/tun`` and the
  namespace tools (:func:`tests.nsutil.netns_capable`). Without them they are
  skipped with the reason, except under ``CI=true``, where a skipped e2e suite
  would make a green run mean nothing: there they fail.
"""

from __future__ import annotations

import os

import pytest

from tests.nsutil import netns_capable

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                         "ci" if os.environ.get("CI") == "true" else "dev"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") is None:
        return
    reason = netns_capable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the e2e tests, but this machine {reason}")
    pytest.skip(reason)
