import json

import datasets
import pytest

from pipeline.errors import UserError
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
