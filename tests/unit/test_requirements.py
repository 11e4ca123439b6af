"""Requirements files: validation with line numbers, normalisation, identity."""

from __future__ import annotations

import hashlib

import pytest

from broker.errors import InvalidArgument
from broker.requirements import RequirementsError, parse_requirements
from broker.validation import check_job_spec
from rigshift.v1 import job_pb2


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("", ()),
        ("# only a comment\n\n   \n", ()),
        ("torch==2.13.0\n", ("torch==2.13.0",)),
        # names canonicalised, duplicates dropped, lines sorted, comments cut
        ("Torch_Vision>=0.1  # vision\nnumpy\nnumpy\n", ("numpy", "torch-vision>=0.1")),
        # a continuation joins two physical lines
        ("requests \\\n  >=2.0\n", ("requests>=2.0",)),
        # markers and extras survive in packaging's canonical form
        (
            'ray[default]>=2.40; python_version >= "3.9"',
            ('ray[default]>=2.40; python_version >= "3.9"',),
        ),
        ("pkg @ https://example.org/pkg-1.0.tar.gz", ("pkg @ https://example.org/pkg-1.0.tar.gz",)),
    ],
)
def test_normalised_lines(text, lines):
    assert parse_requirements(text).lines == lines


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("numpy\n==1.0\n", 2, "not a requirement"),
        ("numpy\n\n--index-url https://evil.example/simple\n", 3, "option --index-url"),
        ("-r other.txt\n", 1, "option -r"),
        ("-e .\n", 1, "option -e"),
        ("torch==2.13.0\nnot a package!\n", 2, "not a requirement"),
        ("x" * (64 << 10) + "\n", 0, "at most 65536 bytes"),
    ],
)
def test_bad_lines_are_named(text, line, words):
    with pytest.raises(RequirementsError) as err:
        parse_requirements(text)
    assert err.value.line == line
    assert words in str(err.value)


def test_identity_is_the_sha256_of_the_normalised_text():
    a = parse_requirements("NumPy\ntorch==2.13.0 # pinned\n")
    b = parse_requirements("torch==2.13.0\n\nnumpy\n")
    assert a.text == b.text == "numpy\ntorch==2.13.0\n"
    assert a.sha256 == b.sha256 == hashlib.sha256(b"numpy\ntorch==2.13.0\n").hexdigest()
    assert parse_requirements("numpy==2\n").sha256 != a.sha256
    assert parse_requirements("").sha256 == ""


def test_job_spec_validation_names_the_field_and_line():
    spec = job_pb2.JobSpec(command=["python"], gpu_count=1)
    spec.environment.python_requirements = "numpy\n!!\n"
    spec.inputs["bad/name"] = "0" * 64
    spec.inputs["data"] = "xyz"
    with pytest.raises(InvalidArgument) as err:
        check_job_spec(spec, 3)
    fields = {v.field: v.description for v in err.value.violations}
    assert fields["spec.environment.python_requirements"].startswith("line 2: not a requirement")
    assert "name must be" in fields["spec.inputs['bad/name']"]
    assert "64 lowercase hex" in fields["spec.inputs['data']"]


def test_job_spec_carries_the_normalised_requirements_and_inputs():
    spec = job_pb2.JobSpec(command=["python"], gpu_count=1)
    spec.environment.python_requirements = "Torch==2.13.0\n"
    spec.inputs["data"] = "a" * 64
    core = check_job_spec(spec, 3)
    assert core.python_requirements == "torch==2.13.0\n"
    assert core.requirements_sha256 == hashlib.sha256(b"torch==2.13.0\n").hexdigest()
    assert core.inputs == (("data", "a" * 64),)
