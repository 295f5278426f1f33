"""A bad job file: exit 2, one line naming the file and the key (or line), nothing sent.

Every case edits one line of a good job file and runs the real CLI against the sandbox;
each uses a channel uuid of its own, so the sandbox's record shows whether it sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from campaign.errors import JobError
from campaign.job import load_job
from tests.helpers import Sandbox, cli, write_csv

GOOD = """\
campaign: test
input: {input}
output_dir: {runs}
api:
  base_url: {url}
  channel_uuid: {channel}
  timeout_s: 2
mapping:
  to_phone: Phone
  default_region: US
  params:
    first_name: First Name
limits:
  rate_per_second: 1000
  concurrency: 4
"""


@dataclass
class Case:
    old: str  # a line of GOOD (or "" to replace the whole file)
    new: str
    says: tuple[str, ...]  # fragments of the one error line (besides the file name)
    command: str = "run"


def limit(key: str, value: str, *says: str) -> Case:
    """GOOD with `limits.KEY: VALUE`, refused naming the key (and `says`)."""
    written = {"rate_per_second": "1000", "concurrency": "4"}[key]
    return Case(f"  {key}: {written}", f"  {key}: {value}", (f"limits.{key}", *says))


CASES = {
    "yaml syntax": Case("  timeout_s: 2", "  timeout_s: [2", ("YAML syntax error", "line 8")),
    "tab indent": Case("  concurrency: 4", "\tconcurrency: 4", ("YAML syntax error", "line 15")),
    "key twice": Case("  timeout_s: 2", "  timeout_s: 2\n  timeout_s: 3", ("line 8", "twice")),
    "not a mapping": Case("", "- just\n- a list\n", ("must be a YAML mapping",)),
    "empty file": Case("", "", ("api: required key is missing",)),
    "unknown top key": Case("limits:", "limit:", ("limit: unknown key", "did you mean limits")),
    "unknown nested key": Case(
        "  timeout_s: 2", "  timeout: 2", ("api.timeout: unknown key", "timeout_s")
    ),
    # `name` and `path` are the job's own attributes (its file's stem and path), not keys.
    "name at the top": Case(
        "campaign: test", "campaign: test\nname: other", ("name: unknown key", "known keys")
    ),
    "path at the top": Case(
        "campaign: test", "campaign: test\npath: other.yaml", ("path: unknown key", "known keys")
    ),
    "key read as true/false": Case(
        "  timeout_s: 2", "  timeout_s: 2\n  yes: 3", ("line 8", "key yes", "true/false")
    ),
    "param name read as a number": Case(
        "    first_name: First Name", "    2024: First Name", ("line 12", "key 2024", "number")
    ),
    "a list as a key": Case(
        "  timeout_s: 2", "  timeout_s: 2\n  ? [a, b]\n  : 3", ("line 8", "must be a name")
    ),
    "merged key unknown": Case(
        "  to_phone: Phone", "  <<: {timeout_s: 2}\n  to_phone: Phone", ("mapping.timeout_s",)
    ),
    "alias inside itself": Case("limits:", "x: &loop\n  - *loop\nlimits:", ("x[0]", "alias")),
    # A param reaches the agent as context.params.<name>: the page's rule, too.
    "param name with a space": Case(
        "    first_name: First Name",
        '    "first name": First Name',
        ("mapping.params: 'first name' is not a usable param name", "0-9 and _"),
    ),
    "param named to_phone": Case(
        "    first_name: First Name", "    to_phone: First Name", ("mapping.params: to_phone",)
    ),
    "constant name with a dash": Case(
        "  default_region: US",
        "  default_region: US\n  constants: {promo-code: x}",
        ("mapping.constants: 'promo-code' is not a usable param name",),
    ),
    "section not a mapping": Case(
        "limits:\n  rate_per_second: 1000\n  concurrency: 4\n",
        "limits: fast\n",
        ("limits: must be a section",),
    ),
    "rate not a number": limit("rate_per_second", "fast"),
    "concurrency not whole": limit("concurrency", "2.5", "integer"),
    "params a list": Case(
        "    first_name: First Name", "    - First Name", ("mapping.params", "`all`")
    ),
    "require_phone not bool": Case(
        "  to_phone: Phone", "  to_phone: Phone\n  require_phone: maybe", ("require_phone",)
    ),
    "rate zero": limit("rate_per_second", "0", "greater than 0"),
    "rate negative": limit("rate_per_second", "-3", "greater than 0"),
    "concurrency zero": limit("concurrency", "0", "from 1 to 1000"),
    "concurrency too high": limit("concurrency", "5000", "from 1 to 1000"),
    "output_dir empty": Case(
        "output_dir: {runs}", "output_dir: ${CAMPAIGN_TEST_NEVER_SET:-}", ("output_dir: is empty",)
    ),
    "unset variable": Case(
        "  channel_uuid: {channel}",
        "  channel_uuid: ${CAMPAIGN_TEST_NEVER_SET}",
        ("api.channel_uuid", "CAMPAIGN_TEST_NEVER_SET", "not set"),
    ),
    "unset variable in validate": Case(
        "  base_url: {url}",
        "  base_url: ${CAMPAIGN_TEST_NEVER_SET}",
        ("api.base_url", "CAMPAIGN_TEST_NEVER_SET"),
        "validate",
    ),
    "bad region": Case(
        "  default_region: US", "  default_region: XX", ("mapping.default_region", "'XX'")
    ),
    "bad base_url": Case("  base_url: {url}", "  base_url: localhost:80", ("api.base_url",)),
    "api missing": Case(
        "api:\n  base_url: {url}\n  channel_uuid: {channel}\n  timeout_s: 2\n",
        "",
        ("api: required key is missing",),
    ),
    "phone column missing": Case(
        "  to_phone: Phone", "  require_phone: true", ("mapping", "to_phone")
    ),
    "recipient key unknown": Case(
        "  to_phone: Phone",
        "  to_phone: Phone\n  recipient_key: [emp_id]",
        ("recipient_key", "emp_id"),
    ),
    "bad campaign id": Case("campaign: test", "campaign: my list", ("campaign", "'my list'")),
    "no input": Case("input: {input}", "", ("no input", "--input")),
    "input missing": Case("input: {input}", "input: {home}/nowhere.csv", ("nowhere.csv",)),
    "output dir not writable": Case(
        "output_dir: {runs}", "output_dir: {home}/plain-file/runs", ("plain-file/runs",)
    ),
}


def fill(text: str, **fields: object) -> str:
    """`{name}` placeholders filled in; unlike str.format, leaves `${VAR}` alone."""
    for name, value in fields.items():
        text = text.replace("{" + name + "}", str(value))
    return text


@dataclass
class Done:
    job: Path
    channel: str
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, module_sandbox: Sandbox
) -> Iterator[dict[str, Future[Done]]]:
    def one(name: str, case: Case) -> Done:
        home = tmp_path_factory.mktemp("job")
        (home / "plain-file").write_text("a file, not a directory\n")
        data = write_csv(home / "in.csv", ["First Name", "Phone"], [["Ann", "415 555 0101"]])
        channel = "job-" + name.replace(" ", "-")
        fields = {
            "input": data,
            "runs": home / "runs",
            "url": module_sandbox.url,
            "channel": channel,
        }
        text = GOOD.replace(case.old, case.new) if case.old else case.new
        assert text != GOOD, f"case {name!r} changes nothing"
        job = home / "job.yaml"
        job.write_text(fill(text, home=home, **fields), encoding="utf-8")
        return Done(job, channel, cli(case.command, str(job), "--no-progress", cwd=home))

    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {name: pool.submit(one, name, case) for name, case in CASES.items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_job_file(
    name: str, outcomes: dict[str, Future[Done]], module_sandbox: Sandbox
) -> None:
    done = outcomes[name].result()
    out = done.result
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("campaign: error: ")
    for fragment in CASES[name].says:
        assert fragment in lines[0], (fragment, lines[0])
    if name not in {"input missing", "output dir not writable"}:  # those name their path
        assert str(done.job) in lines[0]
    assert [r for r in module_sandbox.records() if r["channel"] == done.channel] == []


def test_variables_with_defaults_and_from_the_environment(
    tmp_path: Path, module_sandbox: Sandbox
) -> None:
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["Ann", "415 555 0101"]])
    text = fill(
        GOOD,
        input=data,
        runs=tmp_path / "runs",
        url="${CAMPAIGN_TEST_URL}",
        channel="${CAMPAIGN_TEST_NEVER_SET:-job-defaults}",
    )
    job = tmp_path / "job.yaml"
    job.write_text(text, encoding="utf-8")
    done = cli("run", str(job), "--no-progress", env={"CAMPAIGN_TEST_URL": module_sandbox.url})
    assert done.returncode == 0, done.stderr
    assert [r["body"] for r in module_sandbox.records() if r["channel"] == "job-defaults"] == [
        {"to_phone": "+14155550101", "first_name": "Ann"}
    ]


def test_numbers_in_the_job_file_are_read_as_the_text_written(
    tmp_path: Path, module_sandbox: Sandbox
) -> None:
    data = write_csv(tmp_path / "in.csv", ["2024", "Phone"], [["Ann", "415 555 0101"]])
    text = fill(
        GOOD, input=data, runs=tmp_path / "runs", url=module_sandbox.url, channel="job-numbers"
    )
    text = text.replace("    first_name: First Name", "    first_name: 2024")
    job = tmp_path / "job.yaml"
    job.write_text(text.replace("campaign: test", "campaign: 20240305"), encoding="utf-8")
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "20240305" / "results.csv").exists()
    assert [r["body"] for r in module_sandbox.records() if r["channel"] == "job-numbers"] == [
        {"to_phone": "+14155550101", "first_name": "Ann"}
    ]


def test_merge_keys_merge_and_the_keys_beside_them_win(tmp_path: Path) -> None:
    text = fill(GOOD, input="in.csv", runs="runs", url="http://127.0.0.1:9", channel="written")
    merged = "  <<: {timeout_s: 7, channel_uuid: merged}\n"
    job_file = tmp_path / "merge.yaml"
    job_file.write_text(text.replace("  timeout_s: 2\n", merged), encoding="utf-8")
    job = load_job(job_file)
    assert (job.api.timeout_s, job.api.channel_uuid) == (7, "written")


def test_a_copy_under_another_name_is_checked_like_the_file(tmp_path: Path) -> None:
    text = fill(GOOD, input="in.csv", runs="runs", url="http://127.0.0.1:9", channel="c")
    job_file = tmp_path / "nightly.yaml"
    job_file.write_text(text, encoding="utf-8")
    job = load_job(job_file)
    copy = job.with_changes(name="nightly.web", input="upload.csv", sheet=None)
    assert (copy.name, copy.path, copy.input) == ("nightly.web", str(job_file), "upload.csv")
    assert (job.name, job.input) == ("nightly", "in.csv")
    assert copy.limits == job.limits and copy.mapping == job.mapping
    with pytest.raises(JobError, match=r"limits\.concurrency: "):
        job.with_changes(limits={"concurrency": 0})
    with pytest.raises(JobError, match="path: unknown key"):
        job.with_changes(path="elsewhere")
