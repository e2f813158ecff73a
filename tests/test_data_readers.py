"""Input readers: every bad record is a clear error (strict) or a counted reject naming file/line/field; nothing is
dropped silently and a bad line never stops the rest of the file."""

import json

import pytest

from megatron_offgrpo.preprocess import InputError, read_groups
from megatron_offgrpo.preprocess.readers import problem_id_for


def _ot3(problem, response, domain="math", **extra):
    return {"conversations": [{"from": "human", "value": problem}, {"from": "gpt", "value": response}],
            "domain": domain, "source": "s", **extra}


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))


def _read(paths, **kw):
    rejects = []
    groups = read_groups(paths, on_reject=rejects.append, **kw)
    return groups, rejects


def test_ot3_rows_grouped_by_problem_across_rows(tmp_path):
    path = tmp_path / "a.jsonl"
    _write_lines(path, [json.dumps(_ot3("P1", "r1", answer="3")), json.dumps(_ot3("P2", "x")),
                        json.dumps(_ot3("P1 ", "r2")), json.dumps({"problem": "P2", "responses": ["y", "z"]}),
                        json.dumps({"conversations": [{"role": "user", "content": "P3"},
                                                      {"role": "assistant", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]})])
    groups, rejects = _read([str(path)])
    assert rejects == []
    assert [g.problem.strip() for g in groups] == ["P1", "P2", "P3"]
    assert [g.responses for g in groups] == [["r1", "r2"], ["x", "y", "z"], ["a", "b"]]
    assert groups[0].reference == "3" and groups[0].domain == "math"
    assert groups[0].problem_id == problem_id_for("P1")
    assert groups[0].origins == [f"{path}:1", f"{path}:3"]


def test_bad_lines_are_counted_rejects_and_reading_continues(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [
        json.dumps(_ot3("P1", "ok1")),                    # 1
        '{"conversations": [ {"from": "human"',            # 2 malformed JSON
        b'{"problem": "P1", "responses": ["\xff\xfe"]}\n',  # 3 non-UTF-8 bytes
        json.dumps({"responses": ["x"]}),                  # 4 missing problem
        json.dumps({"problem": "P1"}),                     # 5 missing responses
        json.dumps(_ot3("P1", "   ")),                     # 6 empty response
        json.dumps([1, 2]),                                # 7 not an object
        "",                                                # blank line: not a record
        json.dumps({"conversations": [{"from": "gpt", "value": "a"}]}),  # 9 no user turn
        json.dumps({"problem": "P1", "responses": ["ok2", 5]}),          # 10 one bad response of two
        json.dumps(_ot3("P1", "ok3")),                     # 11
    ])
    groups, rejects = _read([str(path)])
    assert len(groups) == 1 and groups[0].responses == ["ok1", "ok2", "ok3"]
    got = [(r.line, r.reason, r.field) for r in rejects]
    assert got == [
        (2, "malformed_json", None),
        (3, "invalid_utf8", None),
        (4, "missing_field", "problem"),
        (5, "missing_field", "responses"),
        (6, "empty_response", "conversations[0]"),
        (7, "not_an_object", None),
        (9, "missing_field", "conversations"),
        (10, "bad_field", "responses[1]"),
    ]
    assert all(r.file == str(path) for r in rejects)


def test_strict_mode_raises_naming_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [json.dumps(_ot3("P1", "ok")), json.dumps({"problem": "P1"})])
    with pytest.raises(InputError, match=rf"{path}:2: field 'responses': missing_field"):
        read_groups([str(path)], strict=True)


def test_domain_filter_counts_rejects(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_lines(path, [json.dumps(_ot3("P1", "a")), json.dumps(_ot3("C1", "b", domain="code")),
                        json.dumps({"problem": "P2", "responses": ["c"]})])
    groups, rejects = _read([str(path)], domain="math")
    assert [g.problem for g in groups] == ["P1"]
    assert [(r.line, r.reason) for r in rejects] == [(2, "domain_filtered"), (3, "domain_filtered")]


def test_all_responses_rejected_records_the_problem(tmp_path):
    path = tmp_path / "e.jsonl"
    _write_lines(path, [json.dumps(_ot3("P1", "")), json.dumps(_ot3("P2", "fine"))])
    groups, rejects = _read([str(path)])
    assert [g.problem for g in groups] == ["P2"]
    assert [r.reason for r in rejects] == ["empty_response", "no_valid_responses"]


def test_parquet_through_hf_datasets_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_ot3("P1", "r1"), _ot3("P2", "r2"), _ot3("P1", "r3")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    _write_lines(tmp_path / "x.jsonl", [json.dumps(r) for r in rows])
    gp, rp = _read([str(tmp_path / "x.parquet")])
    gj, rj = _read([str(tmp_path / "x.jsonl")])
    assert rp == rj == []
    assert [(g.problem, g.responses) for g in gp] == [(g.problem, g.responses) for g in gj]
    assert gp[0].origins == [f"{tmp_path / 'x.parquet'}:1", f"{tmp_path / 'x.parquet'}:3"]


def test_unknown_and_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_groups([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input format"):
        read_groups([str(tmp_path / "x.csv")])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet"):
        read_groups([str(tmp_path / "bad.parquet")])


def test_duplicate_problem_ids_are_rejected_naming_the_first(tmp_path):
    path = tmp_path / "dup.jsonl"
    _write_lines(path, [
        json.dumps({"problem": "P1", "responses": ["a"], "problem_id": "x"}),  # 1
        json.dumps({"problem": "P2", "responses": ["b"], "problem_id": "x"}),  # 2 another problem, same id
        json.dumps({"problem": "P1", "responses": ["c"], "problem_id": "x"}),  # 3 more of P1: fine
        json.dumps(_ot3("P2", "d", problem_id="x")),                           # 4 more of the duplicate
        json.dumps({"problem": "P3", "responses": ["e"], "id": "y"}),          # 5
    ])
    groups, rejects = _read([str(path)])
    assert [(g.problem, g.problem_id, g.responses) for g in groups] == [("P1", "x", ["a", "c"]), ("P3", "y", ["e"])]
    assert [(r.line, r.reason, r.field, r.problem_id) for r in rejects] == [
        (2, "duplicate_problem_id", "problem_id", "x"), (4, "duplicate_problem_id", "problem_id", "x")]
    assert all(r.detail == f"duplicate problem_id 'x' (first seen at {path}:1)" for r in rejects)
    with pytest.raises(InputError, match=rf"{path}:2: field 'problem_id': duplicate_problem_id: .*first seen at {path}:1"):
        read_groups([str(path)], strict=True)


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_input_without_records_is_an_error(tmp_path, content):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    _write_lines(good, [json.dumps(_ot3("P1", "a"))])
    empty.write_bytes(content)
    with pytest.raises(InputError, match=rf"^{empty}: no records \(the file is empty\)"):
        read_groups([str(good), str(empty)])


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 19])
def test_jsonl_blocks_give_every_line_its_number(tmp_path, block_bytes):
    """The build reads JSONL in blocks cut at newlines and the workers split them: blank lines, CRLF ends, a line
    longer than a block and a last line without a newline come out exactly as a line-by-line read numbers them."""
    from megatron_offgrpo.preprocess.readers import iter_jsonl_blocks, parse_block

    lines = [b'{"a": 1}', b"", b'{"b": "' + b"x" * 150 + b'"}\r', b"   ", b"not json", b'{"c": 3}']
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    expected = [(n, raw) for n, raw in enumerate(lines, start=1) if raw.strip()]
    got = []
    for first, block in iter_jsonl_blocks(str(path), block_bytes=block_bytes):
        got += [(n, raw) for n, raw in enumerate(block.split(b"\n"), start=first) if raw.strip()]
    assert got == expected
    results = [r for first, block in iter_jsonl_blocks(str(path), block_bytes)
               for r in parse_block((str(path), None, first, block))]
    assert [getattr(r, "line", None) or r[0] for r in results] == [1, 3, 5, 6]
