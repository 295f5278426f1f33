"""One rule for param names: the job file's `Mapping`, the page's `PUT .../mapping`, the
names the server guesses for an upload and the ones the page suggests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from campaign.job import Mapping, param_name_problem
from campaign.load import Row
from campaign.web.guess import expand_all, guess_mapping, param_name

APP_JS = Path(__file__).resolve().parent.parent / "campaign" / "web" / "static" / "app.js"

COLUMNS = [  # (header, the param name guessed for it)
    ("First Name", "first_name"),
    ("  Employee ID ", "employee_id"),
    ("Prénom", "prenom"),
    ("Téléphone fixe", "telephone_fixe"),
    ("Straße", "stra_e"),
    ("2024 score", "c_2024_score"),
    ("To Phone", "c_to_phone"),
    ("e-mail", "e_mail"),
    ("名前", "column_9"),
    ("", "column_10"),
    ("__note__", "note"),
    ("Ｆｕｌｌ Ｗｉｄｔｈ", "full_width"),
]


@pytest.mark.parametrize(
    ("name", "usable"),
    [
        ("first_name", True),
        ("_x", True),
        ("X2", True),
        ("first name", False),
        ("first-name", False),
        ("1st", False),
        ("prénom", False),
        ("", False),
        ("to_phone", False),
        ("first_name\n", False),
    ],
)
def test_the_rule(name: str, usable: bool) -> None:
    assert (param_name_problem(name) is None) == usable
    params = {name: "Column"}
    if usable:
        assert Mapping(to_phone="Phone", params=params).params == params
    else:
        with pytest.raises(ValueError, match="param"):
            Mapping(to_phone="Phone", params=params)


def test_guessed_names_pass_the_rule() -> None:
    names = [param_name(column, i) for i, (column, _) in enumerate(COLUMNS)]
    assert names == [name for _, name in COLUMNS]
    assert [n for n in names if param_name_problem(n) is not None] == []


def test_a_guessed_mapping_and_a_spelled_out_all_pass_the_rule() -> None:
    columns = ["Phone", *(column for column, _ in COLUMNS), "first_name"]
    rows = [Row(1, ["+1 415 555 0101", *("x" for _ in COLUMNS), "y"])]
    guessed = guess_mapping(columns, rows, Mapping(to_phone="Phone"))
    assert Mapping.model_validate(guessed).params == guessed["params"]
    assert "first_name_2" in guessed["params"]  # two columns, two names
    spelled = expand_all(Mapping(to_phone="Phone", params="all"), columns)
    assert Mapping.model_validate(spelled).params == spelled["params"]
    # A header that is already a usable name is sent under that name, as `all` does.
    assert spelled["params"]["first_name"] == "first_name"
    assert spelled["params"]["first_name_2"] == "First Name"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's code")
def test_the_page_suggests_the_names_the_server_guesses() -> None:
    source = APP_JS.read_text(encoding="utf-8")
    found = re.search(r"^function suggestName\(.*?^}$", source, re.S | re.M)
    assert found, "suggestName is gone from app.js"
    columns = [column for column, _ in COLUMNS]
    call = f"console.log(JSON.stringify({json.dumps(columns)}.map(suggestName)));"
    script = f"{found.group(0)}\n{call}"
    done = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [name for _, name in COLUMNS]
