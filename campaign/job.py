"""The job file: YAML checked by pydantic, `${VAR}` read from the environment.

Every problem is raised as one `JobError` naming the file and the key, so the command line
can print a single line and exit 2.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from campaign.errors import JobError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CAMPAIGN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
            if isinstance(column, bool) or not isinstance(column, str | int | float):
                raise ValueError(f"{param}: the column name must be text, not {column!r}")
            if not str(column).strip():
                raise ValueError(f"{param}: the column name is empty")
        return {param: str(column) for param, column in value.items()}

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
    abort_after_fatal: int = Field(default=3, ge=1)
    retry_ambiguous: bool = False


class Job(_Strict):
    campaign: str = "{job}-{date}"
    input: str | None = None
    sheet: str | None = None
    output_dir: str = "runs"
    api: Api
    mapping: Mapping
    limits: Limits = Field(default_factory=Limits)

    # Not keys of the file: where it came from, for `{job}` and for messages.
    name: str = Field(default="job", exclude=True)
    path: str = Field(default="", exclude=True)

    def campaign_id(self, today: dt.date | None = None) -> str:
        day = (today or dt.date.today()).isoformat()
        return self.campaign.replace("{job}", self.name).replace("{date}", day)

    @property
    def campaign_has_date(self) -> bool:
        return "{date}" in self.campaign


def expand_vars(value: Any, path: Path, key: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of the parsed YAML."""
    if isinstance(value, dict):
        return {k: expand_vars(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, path, f"{key}[{i}]") for i, v in enumerate(value)]
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


def load_job(path: Path | str, **overrides: Any) -> Job:
    """Read and check a job file; `overrides` replace top-level keys (e.g. `input`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobError(path, "job file not found") from None
    except IsADirectoryError:
        raise JobError(path, "is a directory, not a job file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(path, f"cannot read job file ({exc})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobError(path, f"YAML syntax error: {where}{problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JobError(path, "must be a YAML mapping of keys (campaign, input, api, mapping...)")
    raw = expand_vars(raw, path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        job = Job.model_validate({**raw, "name": path.stem, "path": str(path)})
    except ValidationError as exc:
        raise JobError(path, *first_problem(exc)) from None
    if not CAMPAIGN_ID.fullmatch(job.campaign_id()):
        raise JobError(
            path,
            f"{job.campaign_id()!r} is not a usable campaign id "
            "(letters, digits, '.', '_' and '-' only)",
            key="campaign",
        )
    return job


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice: YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SECTIONS: dict[str, type[BaseModel]] = {"api": Api, "mapping": Mapping, "limits": Limits}


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
    return message, key


def _suggestion(loc: list[str], root: type[BaseModel]) -> str:
    import difflib

    nested = root is Job and len(loc) > 1
    model: type[BaseModel] = _SECTIONS.get(loc[0], Job) if nested else root
    known = [name for name, info in model.model_fields.items() if not info.exclude]
    close = difflib.get_close_matches(loc[-1], known, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
