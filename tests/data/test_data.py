"""Corpora, the byte tokenizer, packing, and the synthetic tasks."""

import random
import re

import pytest
from transformers import AutoTokenizer

from longswap.data import (
    Document,
    associative_recall,
    byte_tokenizer,
    first_integer,
    heldout_key,
    local_documents,
    pack_documents,
    passkey_prompt,
    split_documents,
    stdlib_documents,
)
from longswap.data.synthetic import INTRO, QUESTION, draw_key


def test_stdlib_corpus_keeps_tests_apart():
    train, heldout = stdlib_documents("train"), stdlib_documents("heldout")
    assert len(train) > 500 and len(heldout) > 100
    names = {d.name for d in train}
    assert "stdlib/argparse.py" in names
    assert not any("/test/" in n or n.split("/")[-1].startswith("test_") for n in names)
    assert all("test" in d.name for d in heldout)
    assert not names & {d.name for d in heldout}
    assert sum(len(d.text) for d in train) > 10_000_000  # tens of MB of long files
    with pytest.raises(ValueError, match="part must be"):
        stdlib_documents("all")


def test_local_documents_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 1")
    (tmp_path / "c.csv").write_text("no")
    docs = local_documents([tmp_path])
    assert [d.name for d in docs] == ["a.txt", "sub/b.py"]
    with pytest.raises(ValueError, match="does not exist"):
        local_documents([tmp_path / "missing"])
    with pytest.raises(ValueError, match="unsupported type"):
        local_documents([tmp_path / "c.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        local_documents([tmp_path / "empty"])


def test_split_is_stable_and_disjoint():
    docs = [Document(f"doc{i}", "x") for i in range(400)]
    train, val = split_documents(docs, 0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    again = split_documents(list(reversed(docs)), 0.1)[1]
    assert {d.name for d in val} == {d.name for d in again}


def test_byte_tokenizer_round_trips_and_saves(tmp_path):
    tok = byte_tokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 257 and tok.eos_token_id == 256
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_packing_keeps_document_boundaries():
    packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4, eos_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]  # 0 dropped
    assert packed.document_ids.tolist() == [[0, 0, 0, 0], [1, 1, 1, 2], [2, 2, 2, 2]]
    assert packed.position_ids().tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="too few to fill a single sequence of 64"):
        pack_documents([[1, 2]], seq_len=64)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_places_the_key_at_depth(depth):
    prompt = passkey_prompt(2000, depth, key=48213)
    assert len(prompt) <= 2000 and len(prompt) > 1900
    assert prompt.endswith("What is the pass key? The pass key is")
    needle = "The pass key is 48213. Remember it. 48213 is the pass key. "
    start, end = len(INTRO), len(prompt) - len(QUESTION) - len(needle)  # filler only
    where = (prompt.index(needle) - start) / (end - start)  # share of filler before the key
    sentence = len("There and back again. ") / (end - start)
    assert abs(where - depth) <= sentence + 0.01  # within one sentence


def test_passkey_length_in_tokens_of_a_tokenizer():
    tok = byte_tokenizer()
    prompt = passkey_prompt(500, 0.5, key=12345, count=lambda t: len(tok(t)["input_ids"]))
    assert 450 < len(tok(prompt)["input_ids"]) <= 500


def test_first_integer():
    assert first_integer(" 48213. Remember") == 48213
    assert first_integer("no digits here") is None
    assert first_integer("") is None


def test_heldout_keys_are_disjoint():
    rng = random.Random(0)
    train = {draw_key(rng, heldout=False) for _ in range(200)}
    test = {draw_key(rng, heldout=True) for _ in range(50)}
    assert not train & test and all(heldout_key(k) for k in test)


def test_associative_recall():
    text, answers = associative_recall(pairs=20, queries=3, seed=1)
    lines = text.splitlines()
    pairs = dict(line.split(": ") for line in lines[:20])
    recalled = [line.split(": ") for line in lines[21:]]
    assert [pairs[k] for k, _ in recalled] == answers == [v for _, v in recalled]
    held, _ = associative_recall(pairs=20, queries=3, seed=1, heldout=True)
    assert all(heldout_key(line.split(": ")[0]) for line in held.splitlines()[:20])
    with pytest.raises(ValueError, match="cannot query"):
        associative_recall(2, 3, seed=0)


def test_jsonl_and_parquet_through_datasets(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": "first text", "id": 1}, {"body": "second text", "id": 2}, {"body": ""}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.table({"body": ["third text"]}), tmp_path / "b.parquet")
    docs = local_documents([tmp_path], text_field="body")
    assert [d.text for d in docs] == ["first text", "second text", "third text"]
    assert docs[0].name == "a.jsonl#0"
    with pytest.raises(ValueError, match=r"has no field 'text'; its fields are \['body', 'id'\]"):
        local_documents([tmp_path / "a.jsonl"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"text": "x"}\n\n{"text": "y}\n', "a.jsonl, line 3: not valid JSON"),
        ("a.jsonl", '{"text": "x"}\n[1, 2]\n', "a.jsonl, line 2 is [1, 2], not an object"),
        ("a.jsonl", '{"text": 5}\n', "a.jsonl, line 1: field 'text' holds 5, not text"),
        ("a.json", "[1, 2, 3]", "a.json, row 1 is 1, not an object"),
        ("a.json", '{"text": ["x", "y"]}', 'a.json holds {"text": ["x", "y"]}, not a list of rows'),
        ("a.json", '[{"text": "x"},\n{"text": }]', "a.json, line 2: not valid JSON"),
    ],
)
def test_a_malformed_json_file_is_named_with_its_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        local_documents([tmp_path / name])


def test_json_rows_as_a_list_or_one_per_line(tmp_path):
    (tmp_path / "list.json").write_text('[{"text": "x"}, {"text": "y", "id": 2}, {"id": 3}]')
    (tmp_path / "lines.json").write_text('{"text": "z"}\n{"text": "w"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    docs = local_documents([tmp_path])
    assert [d.name for d in docs] == ["lines.json#0", "lines.json#1", "list.json#0", "list.json#1"]
    assert [d.text for d in docs] == ["z", "w", "x", "y"]


def test_binary_and_latin1_text_files_are_reported(tmp_path):
    from longswap.data import local_documents

    (tmp_path / "good.txt").write_text("plain text")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)))
    with pytest.warns(UserWarning, match=r"2 data file\(s\) are not UTF-8 text"):
        docs = local_documents([tmp_path])
    assert sorted(d.name for d in docs) == ["good.txt", "latin.txt"]  # the binary one skipped
