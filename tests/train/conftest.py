"""A small local corpus copied from the standard library (no download, a few hundred KB)."""

import shutil
import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "typing.py"):
        shutil.copy(stdlib / name, data / name)
    return data
