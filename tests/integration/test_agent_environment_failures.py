"""How a failed environment build is classified (``worker_agent.environments``): whose fault
it is (the client's or the rig's) and what the job's log says, on the output of real uv runs;
and the SetupError that carries it."""

from __future__ import annotations

import pytest

from worker_agent.environments import SetupError, classify_failure

pytestmark = pytest.mark.timeout(120)


# --- classify_failure, on output of real uv runs -----------------------------------------

# Each was produced by running uv (0.13.9, and 0.5.31 for the older boxed style) against a
# find-links dir of hand-made wheels with UV_OFFLINE=1, against a closed or silent local
# port, against an unresolvable host, on a 64 KiB tmpfs, or against PyPI (torch==9.9).
UV_OUTPUTS: list[tuple[str, str, str, str]] = [
    (
        "0.13 no such version",
        """Using Python 3.11.7 environment at: v1
error: No solution found when resolving dependencies
  cause: Because there is no version of rigshift-testpkg==9.9 and you require rigshift-testpkg==9.9, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "client",
        "no version of `rigshift-testpkg==9.9` in the package index",
    ),
    (
        "0.13 no such package on PyPI",
        """Using Python 3.11.7 environment at: tv
error: No solution found when resolving dependencies
  cause: Because nonexistent-pkg-xyz-rigshift-zz was not found in the package registry and you require nonexistent-pkg-xyz-rigshift-zz, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "client",
        "no version of `nonexistent-pkg-xyz-rigshift-zz` in the package index",
    ),
    (
        "0.13 no such package in find-links",
        """error: No solution found when resolving dependencies
  cause: Because nonexistent-pkg-xyz was not found in the provided package locations and you require nonexistent-pkg-xyz, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "client",
        "no version of `nonexistent-pkg-xyz` in the package index",
    ),
    (
        "0.13 only an older version",
        """Using Python 3.11.7 environment at: v1
error: No solution found when resolving dependencies
  cause: Because only rigshift-testpkg==1.0 is available and you require rigshift-testpkg>=2, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "client",
        "no version of `rigshift-testpkg>=2` in the package index "
        "(only rigshift-testpkg==1.0 is there)",
    ),
    (
        "0.13 conflict",
        """Using Python 3.11.7 environment at: v1
error: No solution found when resolving dependencies
  cause: Because all versions of pkg-b depend on pkg-c==2.0 and all versions of pkg-a depend on pkg-c==1.0, we can conclude that all versions of pkg-a and all versions of pkg-b are incompatible.
         And because you require pkg-a and pkg-b, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "client",
        "conflicting requirements: Because all versions of pkg-b depend on pkg-c==2.0 and all "
        "versions of pkg-a depend on pkg-c==1.0, we can conclude that all versions of pkg-a and "
        "all versions of pkg-b are incompatible. And because you require pkg-a and pkg-b, we "
        "can conclude that your requirements are unsatisfiable.",
    ),
    (
        "0.13 build backend fails",
        """Using Python 3.11.7 environment at: v1
   Building badpkg2==1.0
error: Failed to build `badpkg2==1.0`
  cause: The build backend returned an error
  cause: Call to `backend.build_wheel` failed (exit status: 1)

         [stderr]
         Traceback (most recent call last):
           File "<string>", line 11, in <module>
           File "/root/.cache/uv/sdists-v11/index/e1776917174dae1d/badpkg2/1.0/Uxv6cmARA_YEsJj5/src/backend.py", line 2, in build_wheel
             raise RuntimeError("this package does not build")
         RuntimeError: this package does not build

hint: Build failures usually indicate a problem with the package or the build environment
""",  # noqa: E501
        "client",
        "`badpkg2==1.0` failed to build: RuntimeError: this package does not build",
    ),
    (
        "0.13 build requirements missing from the rig's sources",
        """Using Python 3.11.7 environment at: v1
error: Failed to download and build `badpkg==1.0`
  cause: Failed to resolve requirements from `setup.py` build
  cause: No solution found when resolving: `setuptools>=40.8.0`
  cause: Because setuptools was not found in the provided package locations and you require setuptools>=40.8.0, we can conclude that your requirements are unsatisfiable.
""",  # noqa: E501
        "rig",
        "build requirements of `badpkg==1.0` unavailable: Because setuptools was not found in "
        "the provided package locations and you require setuptools>=40.8.0, we can conclude that "
        "your requirements are unsatisfiable.",
    ),
    (
        "0.13 unparsable requirement",
        """error: Couldn't parse requirement in `r5.txt` at position 0
  cause: Expected one of `@`, `(`, `<`, `=`, `>`, `~`, `!`, `;`, found `b`
         foo bar baz ==
             ^
""",
        "client",
        "invalid requirements: Couldn't parse requirement in `r5.txt` at position 0: "
        "Expected one of `@`, `(`, `<`, `=`, `>`, `~`, `!`, `;`, found `b`",
    ),
    (
        "0.13 connection refused (after retries)",
        """Using Python 3.11.7 environment at: v1
error: Request failed after 3 retries in 10.2s
  cause: Failed to fetch: http://127.0.0.1:9/simple/nonexistent-pkg-xyz/
  cause: error sending request for url (http://127.0.0.1:9/simple/nonexistent-pkg-xyz/)
  cause: client error (Connect)
  cause: tcp connect error
  cause: Connection refused (os error 111)
""",
        "rig",
        "package index unreachable: http://127.0.0.1:9/simple/nonexistent-pkg-xyz/ "
        "(Connection refused (os error 111))",
    ),
    (
        "0.13 dns",
        """Using Python 3.11.7 environment at: v1
error: Failed to fetch: http://nonexistent.invalid/simple/nonexistent-pkg-xyz/
  cause: error sending request for url (http://nonexistent.invalid/simple/nonexistent-pkg-xyz/)
  cause: client error (Connect)
  cause: dns error
  cause: error resolving DNS
  cause: failed to lookup address information: Name or service not known
""",
        "rig",
        "package index unreachable: http://nonexistent.invalid/simple/nonexistent-pkg-xyz/ "
        "(failed to lookup address information: Name or service not known)",
    ),
    (
        "0.13 silent index",
        """Using Python 3.11.7 environment at: v1
error: Failed to fetch: http://127.0.0.1:18765/simple/nonexistent-pkg-xyz/
  cause: error sending request for url (http://127.0.0.1:18765/simple/nonexistent-pkg-xyz/)
  cause: operation timed out
""",
        "rig",
        "package index unreachable: http://127.0.0.1:18765/simple/nonexistent-pkg-xyz/ "
        "(operation timed out)",
    ),
    (
        "0.13 offline, not in uv's cache",
        """Using Python 3.11.7 environment at: v1
error: No solution found when resolving dependencies
  cause: Because nonexistent-pkg-xyz was not found in the cache and you require nonexistent-pkg-xyz, we can conclude that your requirements are unsatisfiable.

hint: Packages were unavailable because the network was disabled. When the network is disabled, registry packages may only be read from the cache.
""",  # noqa: E501
        "rig",
        "package not available offline: `nonexistent-pkg-xyz` is not in uv's cache",
    ),
    (
        "0.13 disk full while installing",
        """Using Python 3.11.7 environment at: small/v
Resolved 1 package in 1ms
Prepared 1 package in 1ms
warning: Failed to hardlink files; falling back to full copy. This may lead to degraded performance.
         If the cache and target directories are on different filesystems, hardlinking may not be supported.
         If this is intentional, set `export UV_LINK_MODE=copy` or use `--link-mode=copy` to suppress this warning.
error: Failed to install: bigpkg-1.0-py3-none-any.whl (bigpkg==1.0)
  cause: Failed to copy to `/tmp/uvexp/small/v/lib/python3.11/site-packages/bigpkg-1.0.dist-info/METADATA`
  cause: failed to copy file from /root/.cache/uv/archive-v0/cGGHoez8OfBIolYJ/bigpkg-1.0.dist-info/METADATA to /tmp/uvexp/small/v/lib/python3.11/site-packages/bigpkg-1.0.dist-info/.tmpt6hgDj: No space left on device (os error 28)
""",  # noqa: E501
        "rig",
        "disk full: failed to copy file from /root/.cache/uv/archive-v0/cGGHoez8OfBIolYJ/"
        "bigpkg-1.0.dist-info/METADATA to /tmp/uvexp/small/v/lib/python3.11/site-packages/"
        "bigpkg-1.0.dist-info/.tmpt6hgDj: No space left on device (os error 28)",
    ),
    (
        "0.13 disk full in the cache",
        """error: Failed to initialize cache at `small/cache`
  cause: failed to write to file `/tmp/uvexp/small/cache/CACHEDIR.TAG`: No space left on device (os error 28)
""",  # noqa: E501
        "rig",
        "disk full: failed to write to file `/tmp/uvexp/small/cache/CACHEDIR.TAG`: "
        "No space left on device (os error 28)",
    ),
    (
        "0.13 unknown",
        "error: File not found: /nonexistent.txt\n",
        "rig",
        "File not found: /nonexistent.txt",
    ),
    (
        "0.5 no such version, wrapped",
        """Using Python 3.11.7 environment at: v1
  × No solution found when resolving dependencies:
  ╰─▶ Because there is no version of rigshift-testpkg==9.9 and you require
      rigshift-testpkg==9.9, we can conclude that your requirements are
      unsatisfiable.
""",  # noqa: RUF001
        "client",
        "no version of `rigshift-testpkg==9.9` in the package index",
    ),
    (
        "0.5 no such version on PyPI",
        """Using Python 3.11.7 environment at: v1
  × No solution found when resolving dependencies:
  ╰─▶ Because there is no version of torch==9.9 and you require torch==9.9, we
      can conclude that your requirements are unsatisfiable.
""",  # noqa: RUF001
        "client",
        "no version of `torch==9.9` in the package index",
    ),
    (
        "0.5 no such package",
        """Using Python 3.11.7 environment at: v1
  × No solution found when resolving dependencies:
  ╰─▶ Because nonexistent-pkg-xyz was not found in the provided package
      locations and you require nonexistent-pkg-xyz, we can conclude that your
      requirements are unsatisfiable.
""",  # noqa: RUF001
        "client",
        "no version of `nonexistent-pkg-xyz` in the package index",
    ),
    (
        "0.5 conflict",
        """Using Python 3.11.7 environment at: v1
  × No solution found when resolving dependencies:
  ╰─▶ Because only pkg-a==1.0 is available and pkg-a==1.0 depends on
      pkg-c==1.0, we can conclude that all versions of pkg-a depend on
      pkg-c==1.0.
      And because pkg-b==1.0 depends on pkg-c==2.0 and only pkg-b==1.0 is
      available, we can conclude that all versions of pkg-a and all versions
      of pkg-b are incompatible.
      And because you require pkg-a and pkg-b, we can conclude that your
      requirements are unsatisfiable.
""",  # noqa: RUF001
        "client",
        "conflicting requirements: Because only pkg-a==1.0 is available and pkg-a==1.0 depends "
        "on pkg-c==1.0, we can conclude that all versions of pkg-a depend on pkg-c==1.0. And "
        "because pkg-b==1.0 depends on pkg-c==2.0 and only pkg-b==1.0 is available, we can "
        "conclude that all versions of pkg-a and all versions of pkg-b are incompatible. And "
        "because you require pkg-a and pkg-b, we can conclude that your requirements are "
        "unsatisfiable.",
    ),
    (
        "0.5 connection refused",
        """Using Python 3.11.7 environment at: v1
error: Failed to fetch: `http://127.0.0.1:9/simple/nonexistent-pkg-xyz/`
  Caused by: Request failed after 3 retries
  Caused by: error sending request for url (http://127.0.0.1:9/simple/nonexistent-pkg-xyz/)
  Caused by: client error (Connect)
  Caused by: tcp connect error: Connection refused (os error 111)
  Caused by: Connection refused (os error 111)
""",
        "rig",
        "package index unreachable: http://127.0.0.1:9/simple/nonexistent-pkg-xyz/ "
        "(Connection refused (os error 111))",
    ),
    (
        "0.5 dns",
        """Using Python 3.11.7 environment at: v1
error: Failed to fetch: `http://nonexistent.invalid/simple/torch/`
  Caused by: Could not connect, are you offline?
  Caused by: Request failed after 3 retries
  Caused by: error sending request for url (http://nonexistent.invalid/simple/torch/)
  Caused by: client error (Connect)
  Caused by: dns error: failed to lookup address information: Name or service not known
  Caused by: failed to lookup address information: Name or service not known
""",
        "rig",
        "package index unreachable: http://nonexistent.invalid/simple/torch/ "
        "(failed to lookup address information: Name or service not known)",
    ),
    ("no output at all", "", "rig", "the installer failed without saying why"),
]


@pytest.mark.parametrize(
    ("output", "cause", "message"),
    [case[1:] for case in UV_OUTPUTS],
    ids=[case[0] for case in UV_OUTPUTS],
)
def test_classify_failure(output: str, cause: str, message: str) -> None:
    assert classify_failure(output) == (cause, message)


def test_setup_error_refuses_an_unknown_cause() -> None:
    err = SetupError("disk full: x", "rig")
    assert (err.message, err.cause, str(err)) == ("disk full: x", "rig", "disk full: x")
    with pytest.raises(ValueError, match="cause"):
        SetupError("x", "nobody")
