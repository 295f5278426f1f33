"""Job files built to hang or to confuse: refused in one line, exit 2, in bounded time."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaign.bounds import MAX_JOB_FILE_BYTES
from tests.helpers import cli, write_job

# Nine levels of nine aliases: 9**9 strings once every alias is walked as a copy.
ALIAS_BOMB = """
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def one_line(result: object) -> str:
    stderr: str = getattr(result, "stderr", "")
    assert getattr(result, "returncode", None) == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    job.write_text(job.read_text() + ALIAS_BOMB)
    line = one_line(cli("validate", str(job), timeout=30))
    assert "aliases" in line and str(job) in line


def test_a_job_file_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    job.write_text(job.read_text() + "# " + "x" * MAX_JOB_FILE_BYTES + "\n")
    assert "larger than" in one_line(cli("validate", str(job), timeout=30))


def test_nesting_too_deep_for_a_job_file_is_one_line(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    job.write_text(job.read_text() + "extra: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "nested too deeply" in one_line(cli("validate", str(job), timeout=30))


@pytest.mark.parametrize("zone", ["localtime", "Factory"])
def test_a_timezone_must_be_an_iana_zone_name(tmp_path: Path, zone: str) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9", limits={"timezone": zone})
    line = one_line(cli("validate", str(job)))
    assert "limits.timezone" in line and "IANA" in line


def test_a_timezone_written_as_a_number_is_not_taken_for_a_time(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9", limits={"timezone": 12})
    line = one_line(cli("validate", str(job)))
    assert "limits.timezone" in line and "time zone name" in line
    assert "18:00" not in line
