import json
import os

import datasets
import pytest

from pipeline.errors import UserError
from retrieval import corpus
from retrieval.corpus import CorpusSpec, check_encoding, load_documents, split_wikitext_articles


def test_wikitext_valid_split_has_its_60_articles(wikitext_dir):
    articles = split_wikitext_articles((wikitext_dir / "valid.txt").read_text(encoding="utf-8"))
    assert len(articles) == 60
    assert articles[0][0] == "Homarus gammarus"
    assert all(body and "\n\n" not in body for _, body in articles)
    # section headings stay inside their article, they do not start a new one
    assert "= = Description = =" in articles[0][1]


def test_builtin_corpus_loads(tmp_path):
    docs = load_documents(CorpusSpec(paths=["builtin:wikitext2-sample"]))
    assert 60 <= len(docs) <= 100
    assert docs.column_names == ["doc_id", "title", "text"]
    assert len(set(docs["doc_id"])) == len(docs)


def test_plain_text_file_is_one_document(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("Lobsters are crustaceans.\nThey live in the sea.\n")
    docs = load_documents(CorpusSpec(paths=[str(f)]))
    assert docs[0] == {"doc_id": "notes", "title": "notes",
                       "text": "Lobsters are crustaceans.\nThey live in the sea."}


def test_jsonl_csv_parquet_and_saved_dataset_with_fields(tmp_path):
    rows = [{"id": "a", "headline": "Alpha", "body": "first text"},
            {"id": "b", "headline": "Beta", "body": "second text"},
            {"id": "c", "headline": "Gamma", "body": "  "}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("d.jsonl", "d.csv", "d.parquet", "saved"):
        spec = CorpusSpec(paths=[str(tmp_path / path)], text_field="body", id_field="id",
                          title_field="headline")
        docs = load_documents(spec, cache_dir=tmp_path / "cache")
        assert docs["doc_id"] == ["a", "b"], path  # the blank row is skipped
        assert docs["title"] == ["Alpha", "Beta"] and docs["text"] == ["first text", "second text"]


def test_missing_text_field_lists_the_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(UserError, match="corpus.text_field: column 'text' is not in .*columns are: body"):
        load_documents(CorpusSpec(paths=[str(tmp_path / "d.jsonl")]), cache_dir=tmp_path / "c")


def test_globs_and_max_documents(wikitext_dir):
    docs = load_documents(CorpusSpec(paths=[str(wikitext_dir / "valid.*")], max_documents=7))
    assert len(docs) == 7


def test_missing_file_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="file does not exist 'nope.txt'"):
        load_documents(CorpusSpec(paths=["nope.txt"]))
    with pytest.raises(UserError, match="no file matches the glob"):
        load_documents(CorpusSpec(paths=[str(tmp_path / "*.txt")]))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="no document with text found"):
        load_documents(CorpusSpec(paths=[str(tmp_path / "empty.txt")]))


def test_bad_bytes_are_reported_with_file_and_offset(tmp_path):
    f = tmp_path / "latin.txt"
    data = "caf\u00e9 au lait".encode("utf-8") + b" and cr\xe8me"
    f.write_bytes(data)
    for chunk_size in (4, 1 << 20):  # offsets must survive the incremental decoder's chunking
        with pytest.raises(UserError) as e:
            check_encoding(f, "utf-8", chunk_size=chunk_size)
        assert "latin.txt" in str(e.value) and f"byte offset {data.index(0xE8)}" in str(e.value)
    assert "corpus.errors: replace" in str(e.value)
    docs = load_documents(CorpusSpec(paths=[str(f)], errors="replace"))
    assert "\ufffd" in docs[0]["text"]
    check_encoding(f, "latin-1")  # the same bytes are valid latin-1


def test_binary_file_is_not_text(tmp_path):
    f = tmp_path / "image.txt"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserError, match="image.txt' is not (a text file|valid utf-8)"):
        load_documents(CorpusSpec(paths=[str(f)]))


def test_unknown_extension_and_unknown_builtin(tmp_path):
    (tmp_path / "a.xyz").write_text("x")
    with pytest.raises(UserError, match="corpus.format: cannot tell the format"):
        load_documents(CorpusSpec(paths=[str(tmp_path / "a.xyz")]))
    with pytest.raises(UserError, match="unknown built-in corpus"):
        load_documents(CorpusSpec(paths=["builtin:nope"]))


# --- bad lines in json files and unreadable corpus files (issue 13) ---


def _user_error(spec: CorpusSpec, tmp_path) -> str:
    with pytest.raises(UserError) as e:
        load_documents(spec, cache_dir=tmp_path / "cache")
    return str(e.value)


def test_truncated_jsonl_line_names_file_line_rule_and_value(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "x"}\n{"text": "y"}\n{"text": "a", \n{"text": "z"}\n')
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert msg == (f"corpus: '{f}' line 3 is not valid JSON (Expecting property name enclosed in "
                   f"double quotes, column 15, the end of the line): '{{\"text\": \"a\", '. In a "
                   f"jsonl file each line must be one JSON object, such as {{\"text\": \"...\"}}. "
                   f"Fix or remove that line.")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "x"}\n\n[1,2]\n')  # the blank line counts: the array is on line 3
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert "rows.jsonl' line 3 is a JSON array, not an object: '[1,2]'" in msg
    assert "each line must be one JSON object" in msg and "Fix or remove that line." in msg
    (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n"hello"\n')
    assert "line 2 is a JSON string, not an object" in _user_error(CorpusSpec(paths=[str(f)]), tmp_path)


def test_long_bad_line_is_echoed_to_60_characters(tmp_path):
    f = tmp_path / "long.jsonl"
    f.write_text('{"text": "' + "word " * 40 + '"\n')  # no closing brace
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert "line 1 is not valid JSON (Expecting ',' delimiter, column 212, the end of the line)" in msg
    assert repr(('{"text": "' + "word " * 40)[:60] + "...") in msg


def test_text_field_of_the_wrong_type_names_its_line(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"text": "a"}\n{"text": 5}\n')
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert msg.startswith(f"corpus.text_field: field 'text' on line 2 of '{f}' must be a string, "
                          f"got a JSON number: '{{\"text\": 5}}'.")


def test_loader_failure_keeps_the_file_name_and_says_what_to_check(tmp_path):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"text": "a", "k": 1, "k": "x"}\n')  # valid JSON, but pyarrow rejects it
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert msg.startswith(f"corpus: '{f}' could not be read as jsonl: ArrowInvalid: ")
    assert "An error occurred while generating" not in msg and "same JSON type on every line" in msg
    c = tmp_path / "bad.csv"
    c.write_text("text,title\na,b\nc,d,e,f\n")
    msg = _user_error(CorpusSpec(paths=[str(c)]), tmp_path)
    assert msg.startswith(f"corpus: '{c}' could not be read as csv: ParserError: ")
    assert "Expected 2 fields in line 3, saw 4" in msg


def test_json_arrays_of_objects_load(tmp_path):
    pretty = tmp_path / "pretty.json"
    pretty.write_text('\ufeff[\n  {"text": "a", "title": "A"},\n\n  {"text": "b", "title": "B"}\n]\n')
    one_line = tmp_path / "one_line.json"
    one_line.write_text('[{"text": "c"}, {"text": "d"}]')
    docs = load_documents(CorpusSpec(paths=[str(pretty), str(one_line)]), cache_dir=tmp_path / "cache")
    assert docs["text"] == ["a", "b", "c", "d"] and docs["title"] == ["A", "B", "", ""]


def test_bad_json_arrays(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert msg == (f"corpus: '{f}' line 4 is not valid JSON (Expecting ',' delimiter, column 3): "
                   f"'  {{\"text\": \"c\"}}'. A json file must be one JSON array of objects, or each "
                   f"line must be one JSON object, such as {{\"text\": \"...\"}}. Fix that line.")
    f.write_text('[\n  {"text": "a"},\n  3\n]\n')
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert "a.json' array item 1 is a JSON number, not an object: '3'" in msg
    f.write_text('{\n  "rows": [{"text": "a"}]\n}\n')  # one pretty-printed object
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert "a.json' line 1 is not valid JSON" in msg and "one JSON array of objects" in msg


def test_directory_given_as_a_file_cannot_be_read(tmp_path):
    d = tmp_path / "x.txt"
    d.mkdir()
    msg = _user_error(CorpusSpec(paths=[str(d)], format="text"), tmp_path)
    assert msg == (f"corpus.paths: cannot read '{d}': Is a directory. "
                   f"Check that the file exists and is readable.")


@pytest.mark.timeout(20)  # opening a FIFO blocks until a writer comes: it must never be opened
def test_fifo_is_rejected_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for paths in ([str(fifo)], [str(tmp_path / "*.jsonl")]):
        msg = _user_error(CorpusSpec(paths=paths), tmp_path)
        assert msg == (f"corpus.paths: '{fifo}' is a FIFO (named pipe), not a regular file; corpus "
                       f"files must be regular files (reading it could block). Copy the data into a "
                       f"file and give that.")


def test_file_removed_between_listing_and_reading(tmp_path, monkeypatch):
    f = tmp_path / "gone.jsonl"
    f.write_text('{"text": "a"}\n')
    listed = corpus.resolve_paths

    def list_then_remove(patterns):
        paths = listed(patterns)
        f.unlink()
        return paths

    monkeypatch.setattr(corpus, "resolve_paths", list_then_remove)
    msg = _user_error(CorpusSpec(paths=[str(f)]), tmp_path)
    assert msg == (f"corpus.paths: cannot read '{f}': No such file or directory. "
                   f"Check that the file exists and is readable.")


def test_dangling_symlink_matched_by_a_glob(tmp_path):
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    msg = _user_error(CorpusSpec(paths=[str(tmp_path / "*.txt")]), tmp_path)
    assert f"cannot read '{tmp_path / 'dangling.txt'}': No such file or directory" in msg
