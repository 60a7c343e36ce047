"""The configuration file means the same to dicomflow, Docker Compose and run.sh (issue 21).

dicomflow reads it with python-dotenv (dicomflow/config.py), Compose by its env-file rules
(docs.docker.com, "Interpolation", .env file syntax; compose-go's dotenv parser), run.sh
through `python -m dicomflow.config --shell`. A realistic file and the documented examples
are read as Compose reads them; what Compose reads differently, or differently from one of
its versions to the next (a `$` outside single quotes, a `#` in an unquoted value, a
backslash in quotes), is refused with the line's number and how to write it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dicomflow.config import load_config, parse_env_file
from dicomflow.errors import ConfigError

#: A realistic file: run.sh's generated lines, and what an operator adds by hand.
REALISTIC = r"""# dicomflow configuration, written by run.sh on first start (2026-12-02T10:00:00Z).
DICOMFLOW_HOME=/srv/dicomflow/state
DICOMFLOW_REDIS_URL=redis://:Xy-_z9@127.0.0.1:6389/0
DICOMFLOW_QUEUES=high,default,low
ORTHANC_URL=http://127.0.0.1:8044
# Built-in services stay off until configured, e.g.:
# REPACK_DATADIR=/data/pypx
export REPACK_DATADIR=/data/pypx
CHRIS_URL = http://cube.example.org:8000/api/v1/   # the CUBE API, trailing comment
CHRIS_USERNAME="dicomflow"
CHRIS_PASSWORD='p#ss w=rd $ecret'
CHRIS_PACS_NAME="PACS # not a comment" # a comment
NATS_URL="nats://host:4222#fragment"
ORTHANC_URLS=SITE_A=http://a:8042,SITE_B=http://u:p@b:8042
REPACK_LOGDIR=
DICOMFLOW_PYTHON=C:\odd\path
ORTHANC_PLUGIN_TAGS='PatientID,"Odd",StudyInstanceUID'
DICOMFLOW_DASHBOARD_USERNAME="Let's go!"
EXPORT_NOTE="line one
line two"
	DICOMFLOW_WORKERS=4
"""

#: What Compose reads from it (its documented rules: the comment follows a space when unquoted,
#: or the closing quote; quotes taken off; an unquoted backslash kept as it is).
COMPOSE_READS = {
    "DICOMFLOW_HOME": "/srv/dicomflow/state",
    "DICOMFLOW_REDIS_URL": "redis://:Xy-_z9@127.0.0.1:6389/0",
    "DICOMFLOW_QUEUES": "high,default,low",
    "ORTHANC_URL": "http://127.0.0.1:8044",
    "REPACK_DATADIR": "/data/pypx",
    "CHRIS_URL": "http://cube.example.org:8000/api/v1/",
    "CHRIS_USERNAME": "dicomflow",
    "CHRIS_PASSWORD": "p#ss w=rd $ecret",
    "CHRIS_PACS_NAME": "PACS # not a comment",
    "NATS_URL": "nats://host:4222#fragment",
    "ORTHANC_URLS": "SITE_A=http://a:8042,SITE_B=http://u:p@b:8042",
    "REPACK_LOGDIR": "",
    "DICOMFLOW_PYTHON": "C:\\odd\\path",
    "ORTHANC_PLUGIN_TAGS": 'PatientID,"Odd",StudyInstanceUID',
    "DICOMFLOW_DASHBOARD_USERNAME": "Let's go!",
    "EXPORT_NOTE": "line one\nline two",
    "DICOMFLOW_WORKERS": "4",
}

#: The examples of Compose's documentation, one line each, and what Compose reads.
DOCUMENTED = [
    ("VAR=VAL", "VAL"),
    ('VAR="VAL"', "VAL"),
    ("VAR='VAL'", "VAL"),
    ("VAR=VAL # comment", "VAL"),
    ('VAR="VAL # not a comment"', "VAL # not a comment"),
    ('VAR="VAL" # comment', "VAL"),
    ("VAR='$OTHER'", "$OTHER"),
    ("VAR='${OTHER}'", "${OTHER}"),
    ("export VAR=VAL", "VAL"),
    ("VAR = VAL", "VAL"),
    ("VAR=a=b", "a=b"),
]
#: Documented examples compose-go's versions read differently (`VAL# not a comment`: `VAL` by
#: older ones; backslashes in quotes kept by older ones), and what Compose expands: refused.
REFUSED = [
    ("VAR=VAL# not a comment", "'#'"),
    ("VAR='Let\\'s go!'", "backslash"),
    ('VAR="{\\"hello\\": \\"json\\"}"', "backslash"),
    ('VAR="some\\tvalue"', "backslash"),
    ("VAR=$OTHER", "single quotes"),
    ("VAR=${OTHER:-x}", "single quotes"),
    ('VAR="pa$$word"', "single quotes"),
    ("VAR=a$b # c", "single quotes"),
]


def test_a_realistic_file_reads_as_compose_reads_it(tmp_path):
    path = tmp_path / "dicomflow.env"
    path.write_text(REALISTIC)
    assert load_config(path, environ={}) == COMPOSE_READS


@pytest.mark.parametrize(("line", "value"), DOCUMENTED, ids=[line for line, _ in DOCUMENTED])
def test_composes_documented_examples(line, value):
    assert parse_env_file(line + "\n", for_compose=True) == {"VAR": value}


@pytest.mark.parametrize(("line", "why"), REFUSED, ids=[line for line, _ in REFUSED])
def test_what_compose_reads_otherwise_is_refused_with_its_line(tmp_path, line, why):
    path = tmp_path / "dicomflow.env"
    path.write_text(f"# first\nA=1\n{line}\n")
    with pytest.raises(ConfigError, match=r"dicomflow.env:3: VAR: ") as error:
        load_config(path, environ={})
    assert why in str(error.value)
    assert not {"OTHER", "word", "hello", "tvalue", "go", "comment"} & set(re.findall(r"\w+", str(error.value)))
    # Other files read with the same rules (a destination's secrets) are read as python-dotenv reads them.
    assert parse_env_file(line + "\n")["VAR"]


@pytest.mark.parametrize("text", ["A=1\nnot an assignment\n", "A=1\nLONELY\n", 'A=1\nB="never closed\n'])
def test_a_line_that_is_not_an_assignment_is_named(text):
    with pytest.raises(ConfigError, match=r"c.env:2: expected KEY=VALUE"):
        parse_env_file(text, "c.env")


def test_run_sh_reads_every_value_alike(tmp_path):
    """run.sh evaluates `python -m dicomflow.config --shell`: bash then holds the same values."""
    path = tmp_path / "dicomflow.env"
    path.write_text(REALISTIC)
    script = ('set -euo pipefail; set -a; eval "$("$PY" -m dicomflow.config --shell)"; set +a; '
              'for k in ' + " ".join(COMPOSE_READS) + '; do printf "%s=%s\\0" "$k" "${!k}"; done')
    env = {"PATH": os.environ["PATH"], "PY": sys.executable, "DICOMFLOW_CONFIG": str(path)}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    read = dict(item.split("=", 1) for item in done.stdout.split("\0") if item)
    assert read == COMPOSE_READS
