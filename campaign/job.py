"""The job file: YAML checked by pydantic, `${VAR}` read from the environment.

Every problem is raised as one `JobError` naming the file and the key, so the command line
can print a single line and exit 2.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from campaign.bounds import MAX_JOB_FILE_BYTES, MAX_YAML_ALIASES
from campaign.errors import JobError, OptionError, UsageError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A param reaches the agent as `context.params.<name>`: a name its script can write so.
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def param_name_problem(name: object) -> str | None:
    """Why `name` cannot be a param (or constant) name, None when it can: the one rule for
    the job file, the page's mapping and the names the page guesses."""
    if name == "to_phone":
        return "to_phone is not a param: the phone comes from mapping.to_phone"
    if not isinstance(name, str) or not PARAM_NAME.fullmatch(name):
        return (
            f"{name!r} is not a usable param name: use A-Z, a-z, 0-9 and _, not starting "
            "with a digit (the agent reads it as context.params.<name>)"
        )
    return None


class _Strict(BaseModel):
    # YAML reads `sheet: 2024` or a column called `2024` as a number; the operator meant text.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class Api(_Strict):
    base_url: str = "https://cx.avaamo.com"
    channel_uuid: str
    timeout_s: float = Field(default=15, gt=0, le=600, allow_inf_nan=False)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("channel_uuid")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip() or "/" in value:
            raise ValueError("must be the channel's uuid")
        return value.strip()


class Mapping(_Strict):
    to_phone: str | None = None
    default_region: str = "US"
    require_phone: bool = True
    params: dict[str, str] | Literal["all"] = Field(default_factory=dict)
    constants: dict[str, str | int | float | bool] = Field(default_factory=dict)
    recipient_key: list[str] = Field(default_factory=lambda: ["to_phone"], min_length=1)

    @field_validator("params", mode="before")
    @classmethod
    def _params_shape(cls, value: Any) -> Any:
        # Checked here rather than by the union type, whose error names pydantic's types.
        if value is None:
            return {}
        if value == "all":
            return value
        if not isinstance(value, dict):
            raise ValueError("must be the word `all` or lines of `param_name: Column Name`")
        for param, column in value.items():
            if problem := param_name_problem(param):
                raise ValueError(problem)
            if isinstance(column, bool) or not isinstance(column, str | int | float):
                raise ValueError(f"{param}: the column name must be text, not {column!r}")
            if not str(column).strip():
                raise ValueError(f"{param}: the column name is empty")
        return {param: str(column) for param, column in value.items()}

    @field_validator("constants", mode="before")
    @classmethod
    def _constant_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if problem := param_name_problem(name):
                    raise ValueError(problem)
        return value

    @field_validator("default_region", mode="before")
    @classmethod
    def _not_a_yaml_boolean(cls, value: object) -> object:
        if isinstance(value, bool):  # Norway's NO is YAML's false
            raise ValueError("YAML read this as true/false: write the region in quotes, e.g. 'NO'")
        return value

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        import phonenumbers

        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region code phonenumbers knows (e.g. US, GB, IN)")
        return region

    @model_validator(mode="after")
    def _keys_exist(self) -> Mapping:
        if self.require_phone and not self.to_phone:
            raise ValueError("to_phone: a column is required unless require_phone is false")
        known = {"to_phone"} if self.to_phone else set()
        if self.params != "all":
            known |= set(self.params)
            known |= set(self.constants)
            unknown = [k for k in self.recipient_key if k not in known]
            if unknown:
                raise ValueError(
                    f"recipient_key: {', '.join(unknown)} is not a payload key "
                    f"(known: {', '.join(sorted(known)) or 'none'})"
                )
        return self


class Limits(_Strict):
    rate_per_second: float = Field(default=10, gt=0, allow_inf_nan=False)
    concurrency: int = Field(default=10, gt=0, le=1000)
    max_attempts: int = Field(default=5, ge=1, le=100)
    abort_after_fatal: int = Field(default=3, ge=1, le=1_000_000)
    retry_ambiguous: bool = False
    # With a PostgreSQL ledger: a worker without a heartbeat this long is taken for dead,
    # and its people in flight become `unknown` (see store/ledger.py).
    lease_s: float = Field(default=30, ge=1, le=3600, allow_inf_nan=False)
    # Compliance (see `windows`): the recipient's local hours, the zone for numbers without
    # a single one, and the time after which no new request leaves.
    send_window: str | None = None
    timezone: str | None = None
    deadline: str | None = None

    @field_validator("send_window", "timezone", "deadline", mode="before")
    @classmethod
    def _text(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, dt.datetime) and info.field_name == "deadline":
            return value.isoformat()  # YAML reads an unquoted ISO time as a datetime
        if info.field_name == "timezone" and value is not None and not isinstance(value, str):
            raise ValueError(
                f"must be a time zone name (like America/New_York), not {_yaml_kind(value)}"
            )
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 18:00 as the number 1080 (base 60).
            raise ValueError('YAML read this as a number: write the time in quotes, like "18:00"')
        if value is not None and not isinstance(value, str):
            raise ValueError(f"must be text in quotes, not {_yaml_kind(value)}")
        return value

    @field_validator("send_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        from campaign.windows import parse_window

        if value is not None:
            parse_window(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        from campaign.windows import parse_zone

        if value is None:
            return value
        parse_zone(value)
        # ZoneInfo also takes the system's "localtime" file and tzdata's "Factory": they
        # name no place, so a window or deadline in them would mean nothing definite.
        if value.strip() not in _iana_zones():
            raise ValueError(f"{value!r} is not an IANA time zone name (like America/New_York)")
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str | None) -> str | None:
        from campaign.windows import check_deadline

        if value is not None:
            check_deadline(value)
        return value

    @model_validator(mode="after")
    def _zone_when_needed(self) -> Limits:
        from campaign.windows import check_deadline

        if self.timezone is None and self.send_window is not None:
            raise ValueError(
                "timezone: required with send_window (for numbers that have no single zone)"
            )
        if self.timezone is None and self.deadline is not None and check_deadline(self.deadline):
            raise ValueError(
                "timezone: required with a deadline that has no UTC offset (which zone's "
                f"{self.deadline}?)"
            )
        return self


@functools.cache
def _iana_zones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones() - {"Factory", "localtime", "posixrules"})


# Phrases of a delivery error that put the number on the suppression list (any case).
SUPPRESS_ON = ("unsubscribed", "not a valid mobile number", "landline")


class Reporting(_Strict):
    """`reporting:`, for `campaign reconcile`: the SMS Reporting API of the agent."""

    agent_id: str
    access_token: str = Field(repr=False)  # never in a repr, a log or a crash file
    base_url: str | None = None  # None: api.base_url
    rate_per_second: float = Field(default=5, gt=0, le=1000, allow_inf_nan=False)
    settle_minutes: float = Field(default=30, ge=0, le=7 * 24 * 60, allow_inf_nan=False)
    suppress_on: list[str] = Field(default_factory=lambda: list(SUPPRESS_ON))
    # The channel's sending number: the Reporting API is asked for its entries only.
    from_phone: str | None = None
    # Avaamo's own opt-outs, read into the suppression list before every send: `required`
    # stops a run whose sync failed unless the last whole one is younger than the age.
    opt_status: Literal["required", "off"] = "required"
    opt_status_max_age_hours: float = Field(default=24, ge=0, le=24 * 365, allow_inf_nan=False)

    @field_validator("agent_id")
    @classmethod
    def _a_number(cls, value: str) -> str:
        # Never echoed: an operator may have pasted the token here by mistake.
        if not value.strip().isdigit():
            raise ValueError("must be the agent's number (digits only)")
        return value.strip()

    @field_validator("access_token")
    @classmethod
    def _a_token(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: give the Reporting API's access token")
        if any(ch.isspace() or not ch.isprintable() for ch in value.strip()):
            raise ValueError("must be one word (no spaces or control characters)")
        return value.strip()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else Api._http_url(value)

    @field_validator("from_phone", mode="before")
    @classmethod
    def _e164(cls, value: object) -> object:
        import phonenumbers

        if value is None:
            return None
        text = str(value).strip()
        try:
            number = phonenumbers.parse(text, None)
        except phonenumbers.NumberParseException:
            number = None
        if not text.startswith("+") or number is None or not phonenumbers.is_valid_number(number):
            raise ValueError("must be the sending number in E.164, with its country code (+...)")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    @field_validator("suppress_on")
    @classmethod
    def _phrases(cls, value: list[str]) -> list[str]:
        if any(not phrase.strip() for phrase in value):
            raise ValueError("a phrase is empty (it would match every delivery error)")
        return [phrase.strip() for phrase in value]


class Job(_Strict):
    campaign: str = "{job}-{date}"
    input: str | None = None
    sheet: str | None = None
    output_dir: str = "runs"
    api: Api
    mapping: Mapping
    limits: Limits = Field(default_factory=Limits)
    reporting: Reporting | None = None
    # Where the ledgers, the suppression list and the locks are: None for SQLite files
    # under output_dir, or a postgresql:// URL (many hosts).
    ledger: str | None = None
    # `campaign test` and the page's test send: the numbers a test goes to by default.
    test_recipients: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("test_recipients", mode="before")
    @classmethod
    def _phones(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, list):
            return value  # pydantic names the type it wants
        mapping = info.data.get("mapping")
        region = mapping.default_region if isinstance(mapping, Mapping) else "US"
        from campaign.phones import normalize_phone

        phones = []
        for i, item in enumerate(value):
            phone, why = normalize_phone(str(item).strip(), region)
            if phone is None:
                raise ValueError(f"entry {i + 1}: {why}")
            phones.append(phone)
        return phones

    @field_validator("ledger")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        from campaign.store.db import is_postgres

        if value is not None and not is_postgres(value.strip()):
            raise ValueError("must be a postgresql:// URL (leave it out for SQLite files)")
        return None if value is None else value.strip()

    @field_validator("input", "output_dir")
    @classmethod
    def _a_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        # An empty `${VAR:-}` or `--input "$UNSET"`: "" would quietly mean another file or
        # the current directory.
        if value is not None and not value.strip():
            here = " (. for the current directory)" if info.field_name == "output_dir" else ""
            raise ValueError(f"is empty: give a path{here}")
        return value

    # Not keys of the file: where it came from, for `{job}` and for messages. Private
    # attributes, so that no key of the file (`name:`, `path:`) can set them.
    _name: str = PrivateAttr(default="job")
    _path: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The job's name: its file's stem, `{job}` in campaign ids."""
        return self._name

    @property
    def path(self) -> str:
        """The job file, for messages."""
        return self._path

    def with_changes(self, name: str | None = None, **keys: Any) -> Job:
        """A copy with top-level keys replaced, checked like the file's own (raises
        `JobError` naming the key), under another `name` when one is given."""
        try:
            job = Job.model_validate({**self.model_dump(), **keys})
        except ValidationError as exc:
            raise JobError(self.path, *first_problem(exc)) from None
        job._name = self.name if name is None else name
        job._path = self.path
        return job

    def campaign_id(self, today: dt.date | None = None) -> str:
        day = (today or dt.date.today()).isoformat()
        return self.campaign.replace("{job}", self.name).replace("{date}", day)

    def campaign_for(self, given: str | None) -> str:
        """`--campaign` when given, else today's campaign of this job."""
        # `--campaign ""` (an unset variable) is refused, not read as "the default campaign".
        campaign = self.campaign_id() if given is None else given
        if not CAMPAIGN_ID.fullmatch(campaign):
            raise UsageError(f"--campaign {campaign!r}: use letters, digits, '.', '_' and '-' only")
        return campaign


def expand_vars(
    value: Any, path: Path, key: str = "", _inside: frozenset[int] = frozenset()
) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the parsed YAML."""
    if isinstance(value, dict | list):
        if id(value) in _inside:  # `a: &x {b: *x}`: YAML allows it, no job key means it
            raise JobError(path, "an alias (*name) refers to a section that holds it", key=key)
        inside = _inside | {id(value)}
        if isinstance(value, dict):
            return {
                k: expand_vars(v, path, f"{key}.{k}" if key else str(k), inside)
                for k, v in value.items()
            }
        return [expand_vars(v, path, f"{key}[{i}]", inside) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise JobError(path, f"environment variable {name} is not set", key=key)
            return default
        return found

    return _VAR.sub(substitute, value)


@dataclass(frozen=True)
class Override:
    """A key of the job given from outside the file (a command-line option): checked like
    the file's own keys, and named as the operator gave it when it is wrong."""

    key: str  # dotted, e.g. "limits.concurrency"
    value: Any
    given_as: str  # e.g. "--concurrency"


def load_job(path: Path | str, *overrides: Override) -> Job:
    """Read and check a job file, with `overrides` in place of the keys they name."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_JOB_FILE_BYTES + 1)
        if len(data) > MAX_JOB_FILE_BYTES:
            raise JobError(path, f"is larger than {MAX_JOB_FILE_BYTES // 1024} KB: not a job file")
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise JobError(path, "job file not found") from None
    except IsADirectoryError:
        raise JobError(path, "is a directory, not a job file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(path, f"cannot read job file ({exc})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no objects
    except RecursionError:
        raise JobError(path, "nested too deeply to be a job file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        kind = "" if isinstance(exc, _KeyProblem) else "YAML syntax error: "
        raise JobError(path, f"{kind}{where}{problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobError(path, "must be a YAML mapping of keys (campaign, input, api, mapping...)")
    try:
        raw = expand_vars(raw, path)
    except RecursionError:
        raise JobError(path, "nested too deeply to be a job file") from None
    for override in overrides:
        *sections, name = override.key.split(".")
        into = raw
        for section in sections:
            into = into.setdefault(section, {})
            if not isinstance(into, dict):  # the file's section is not a section: say so
                break
        else:
            into[name] = override.value
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        message, key = first_problem(exc)
        for override in overrides:
            if override.key == key:
                value = override.value
                shown = f", not {value:.15g}" if isinstance(value, int | float) else ""
                raise OptionError(override.given_as, message + shown) from None
        raise JobError(path, message, key) from None
    job._name, job._path = path.stem, str(path)
    if not CAMPAIGN_ID.fullmatch(job.campaign_id()):
        raise JobError(
            path,
            f"{job.campaign_id()!r} is not a usable campaign id "
            "(letters, digits, '.', '_' and '-' only)",
            key="campaign",
        )
    return job


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _KeyProblem(yaml.constructor.ConstructorError):
    """A key no job file can use: written twice, or not a name."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose keys are names, each written once.

    YAML would silently keep the last of two equal keys, and reads `yes:`, `1:` or `~:`
    as true, a number or null, which no key of a job file (a section, a setting, a param
    name) can be. Merge keys (`<<: *anchor`) keep their YAML meaning: the keys written
    beside them win, and the merged keys are checked like any others."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _KeyProblem(
                    None, None, "a key must be a name, not a list or a section", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise _KeyProblem(
                    None,
                    None,
                    f"key {key_node.value or '(empty)'} is read by YAML as {_yaml_kind(key)}, "
                    "not as a name; write it in quotes if a name is meant",
                    key_node.start_mark,
                )
            if key in seen:
                raise _KeyProblem(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: Any, index: Any) -> Any:
        # An alias is read as a reference, but `expand_vars` and the checks walk it as a
        # copy: a few nested aliases ("billion laughs") would cost minutes and gigabytes.
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise _KeyProblem(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases (*name): refused", mark
                )
        return super().compose_node(parent, index)


def _yaml_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dt.date):
        return "a date"
    return type(value).__name__


_SECTIONS: dict[str, type[BaseModel]] = {
    "api": Api,
    "mapping": Mapping,
    "limits": Limits,
    "reporting": Reporting,
}


def first_problem(
    exc: ValidationError, root: type[BaseModel] | None = None
) -> tuple[str, str | None]:
    """(message, dotted key) for the error an operator should fix first; `root` is the model
    that was validated (the whole job by default)."""
    # A misspelt key also makes its right spelling "missing": name the misspelling first.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or None
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if error["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(loc, root or Job)
    elif error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] in {"model_type", "dict_type"}:
        message = "must be a section of `key: value` lines"
    elif error["type"] in _OUT_OF_RANGE and (field := _field(loc, root or Job)) is not None:
        message = "must be " + allowed_range(field)
    return message, key


_OUT_OF_RANGE = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "finite_number",
}


def _field(loc: list[str], model: type[BaseModel]) -> FieldInfo | None:
    for part in loc[:-1]:
        section = model.model_fields.get(part)
        if section is None or not (
            isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel)
        ):
            return None
        model = section.annotation
    return model.model_fields.get(loc[-1]) if loc else None


def allowed_range(field: FieldInfo) -> str:
    """`a whole number from 1 to 1000`: a numeric key's bounds as one phrase."""
    bounds: dict[str, float] = {}
    for rule in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(rule, name, None) is not None:
                bounds[name] = getattr(rule, name)
    whole = field.annotation is int
    if whole:  # the strict bounds of a whole number are the next whole numbers
        if "gt" in bounds:
            bounds["ge"] = math.floor(bounds.pop("gt")) + 1
        if "lt" in bounds:
            bounds["le"] = math.ceil(bounds.pop("lt")) - 1
    noun = "a whole number" if whole else "a number"
    low, high = bounds.get("ge"), bounds.get("le")
    if low is not None and high is not None:
        return f"{noun} from {low:g} to {high:g}"
    words = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
    said = " and ".join(f"{words[k]} {v:g}" for k, v in bounds.items())
    return f"{noun} {'of ' if said.startswith('at ') else ''}{said}".strip()


def _suggestion(loc: list[str], root: type[BaseModel]) -> str:
    import difflib

    nested = root is Job and len(loc) > 1
    model: type[BaseModel] = _SECTIONS.get(loc[0], Job) if nested else root
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
