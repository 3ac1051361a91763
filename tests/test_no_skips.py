"""The suite's own rule, tested (issue 23, item 6): a skip is a failure unless it is a platform limit
listed in conftest.PLATFORM_ONLY, and a missing component fails naming its install step.

The hook is run the way pytest runs it: a pytest subprocess over small test files that sit beside a
copy of tests/conftest.py, whose JUnit report gives each outcome. The expected outcomes are written
here, one per way of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import helpers_media as hm
import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

# file -> (its source, the outcome of each of its tests: JUnit's failure or error element (a skip
# turned into a failure in the call, or in the setup, where skipif and an empty parametrization
# skip), skipped, passed)
CASES = {
    "test_skip.py": ("import pytest\n\ndef test_it():\n    pytest.skip('not today')\n", {"test_it": "failure"}),
    "test_skipif.py": (
        "import pytest\n\n@pytest.mark.skipif(True, reason='always')\ndef test_it():\n    pass\n",
        {"test_it": "error"},
    ),
    "test_empty.py": (
        "import pytest\n\n@pytest.mark.parametrize('x', [])\ndef test_it(x):\n    pass\n",
        {"test_it[NOTSET]": "error"},
    ),
    # importorskip at import time: a collection report, which JUnit writes as an error of the module
    "test_importorskip.py": (
        "import pytest\n\npytest.importorskip('edge_t2t_no_such_module')\n\ndef test_it():\n    pass\n",
        {"test_importorskip": "error"},
    ),
    # the allowed skip: a test marked with a platform this copy of conftest says it is not on
    "test_platform.py": (
        "import pytest\n\n@pytest.mark.linux_only\ndef test_it():\n    pass\n",
        {"test_it": "skipped"},
    ),
    "test_passes.py": ("def test_it():\n    pass\n", {"test_it": "passed"}),
}


def _outcomes(report: Path) -> dict[tuple[str, str], str]:
    """(module, test name) -> failure / error / skipped / passed, from a JUnit XML report."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        module = case.get("classname") or case.get("name")  # a collection error has no classname
        out[(module, case.get("name"))] = kinds[0] if kinds else "passed"
    return out


def test_a_skip_fails_unless_it_is_a_platform_limit(tmp_path: Path) -> None:
    # This copy of the hook is told it runs on no Linux, so the linux_only marker skips.
    conftest = CONFTEST.read_text(encoding="utf-8") + '\nPLATFORM_ONLY["linux_only"] = (False, "Linux only")\n'
    (tmp_path / "conftest.py").write_text(conftest, encoding="utf-8")
    for name, (source, _) in CASES.items():
        (tmp_path / name).write_text(source, encoding="utf-8")
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(hm.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                          "-c", os.devnull, "--continue-on-collection-errors", f"--junitxml={report}", *CASES],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=hm.HANG_S)  # fmt: skip
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]  # 1: some tests failed
    got = _outcomes(report)
    want = {(name.removesuffix(".py"), test): outcome for name, (_, tests) in CASES.items() for test, outcome in tests.items()}
    assert got == want, res.stdout[-3000:]
    assert "a skip is a failure (tests/conftest.py PLATFORM_ONLY lists the allowed ones): Skipped: not today" in res.stdout


def test_a_missing_component_fails_naming_the_fix() -> None:
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as err:
        hm.require("edge_t2t_no_such_module", "pip install the-missing-piece")
    assert err.type is pytest.fail.Exception  # a failure, not a skip
    assert str(err.value).startswith("edge_t2t_no_such_module cannot be imported (")
    assert str(err.value).endswith("): pip install the-missing-piece")
    assert hm.require("json", "never needed").__name__ == "json"
