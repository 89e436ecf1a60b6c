"""Suite-wide test settings.

* Hypothesis: a ``ci`` profile (no deadline: a 2-core CI machine stalls now
  and then; derandomized so a CI failure replays locally) is loaded when
  ``CI=true``; ``HYPOTHESIS_PROFILE`` picks another.
* End-to-end tests (marked ``e2e``) need root and ``/dev/net/tun``. Without
  them they are skipped with the reason, except under ``CI=true``, where a
  skipped e2e suite would make a green run mean nothing: there they fail.
"""

from __future__ import annotations

import os

import pytest

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


def e2e_missing() -> str | None:
    """Why end-to-end tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "e2e tests need /dev/net/tun"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = e2e_missing()
    if reason is None or os.environ.get("CI") == "true":
        return  # under CI the e2e fixtures fail with the reason instead
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
