"""Input pipeline tests. The reference for every packing check is the plain token stream
`[bos] + encode(doc) + [eos]` per document, computed in the test from the documents it wrote."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from dsjax.data.corpus import embedded_documents
from dsjax.train.data import (DataConfig, DataError, holdout_indices, iterate_documents, make_dataset,
                              state_from_bytes, state_to_bytes)
from dsjax.train.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

BT = ByteTokenizer()
DOCS = ["alpha beta", "gamma", "a much longer document that will not fit in one row of sixteen tokens",
        "delta epsilon", "zeta", "eta theta iota", "kappa"]


def _stream(docs, tok=BT) -> list[int]:
    return [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]


def _text_cfg(tmp_path, docs=DOCS, holdout=False, **kw) -> DataConfig:
    """A text corpus; unless `holdout`, eval reads the same file, so train sees every document."""
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(docs) + "\n")
    return DataConfig(source="text", paths=(str(f),), eval_paths=() if holdout else (str(f),), **kw)


def _ds(cfg, split="train", seed=0, seq_len=16, batch_size=2, pi=0, pc=1):
    return make_dataset(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split,
                        process_index=pi, process_count=pc)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _check_rows(batch):
    """Segment ids/positions consistent per row; returns the row-major non-padding tokens."""
    toks, segs, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    assert toks.dtype == segs.dtype == pos.dtype == np.int32
    out = []
    for t, s, p in zip(toks, segs, pos):
        n = int((s > 0).sum())
        assert (s[n:] == 0).all() and (t[n:] == 0).all() and (p[n:] == 0).all(), "padding only at the tail"
        if n:
            assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}, "segments 1, 2, ... in order"
            for k in range(1, int(s[n - 1]) + 1):
                assert (p[s == k] == np.arange((s == k).sum())).all(), "positions restart at 0 per segment"
        out.extend(t[:n].tolist())
    return out


def _documents_in(batches, tok=BT) -> list[str]:
    """Decode a finite pass back into documents by splitting the stream at bos/eos."""
    stream = [t for b in batches for t in _check_rows(b)]
    docs, cur = [], None
    for t in stream:
        if t == tok.bos_id:
            cur = []
        elif t == tok.eos_id:
            docs.append(tok.decode(cur))
        else:
            cur.append(t)
    return docs


# ----------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_ids_and_utf8_roundtrip():
    assert (BT.pad_id, BT.bos_id, BT.eos_id, BT.vocab_size) == (0, 1, 2, 512)
    assert BT.encode("A") == [ord("A") + 3] and BT.token_to_id("<think>") == 259
    assert BT.token_to_id("<|assistant|>") == 264
    for text in ["plain ascii", "héllo wörld — 日本語 🙂", "<|user|>2+2?<|assistant|><think>4</think><answer>4</answer>", ""]:
        ids = BT.encode(text)
        assert all(0 <= i < BT.vocab_size for i in ids)
        assert BT.decode(ids) == text
    assert BT.encode("<think>x") == [259, ord("x") + 3]
    assert BT.decode([1, *BT.encode("é"), 2, 0]) == "é"  # bos / eos / pad carry no text
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def _tiny_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the bone", "a cat and a dog"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_tokenizer_json(tmp_path):
    path = _tiny_hf_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))  # the directory works as well as the file
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(json.loads(path.read_text())["model"]["vocab"])
    ids = tok.encode("the cat ate the bone")
    assert len(ids) == 5 and tok.decode(ids) == "the cat ate the bone"
    assert tok.token_to_id("cat") == ids[1]
    # ... and it drives the pipeline.
    cfg = _text_cfg(tmp_path, ["the cat sat", "a dog ate the bone"], tokenizer=str(path))
    assert _documents_in(list(_ds(cfg, split="eval")), tok) == ["the cat sat", "a dog ate the bone"]
    with pytest.raises(TokenizerError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------------- packing

def test_packing_rows_consistent_and_stream_recovered(tmp_path):
    cfg = _text_cfg(tmp_path, shuffle=False)
    it = _ds(cfg, seq_len=16, batch_size=2)
    want = _stream(DOCS)
    got = [t for b in _take(it, 12) for t in _check_rows(b)]  # 384 tokens: several epochs, in order
    reps = -(-len(got) // len(want))
    assert got == (want * reps)[: len(got)]
    # eval: one ordered pass, the final batch padded with segment-0 rows, every document once.
    ev = list(_ds(cfg, split="eval"))
    assert [t for b in ev for t in _check_rows(b)] == want
    assert (ev[-1]["segment_ids"][-1] == 0).all() or len(want) % 16 == 0
    assert all(b["tokens"].shape == (2, 16) for b in ev)


def test_seeded_determinism_and_seed_sensitivity():
    cfg = DataConfig()  # embedded corpus
    a = _take(_ds(cfg, seed=3, seq_len=32), 3)
    b = _take(_ds(cfg, seed=3, seq_len=32), 3)
    c = _take(_ds(cfg, seed=4, seq_len=32), 3)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    for x in a:
        _check_rows(x)
        assert x["tokens"].max() < 512


def test_process_shards_disjoint_and_covering(tmp_path):
    docs = [f"document number {i}" for i in range(11)]
    f = tmp_path / "d.txt"
    f.write_text("\n\n".join(docs))
    cfg = DataConfig(source="text", paths=(str(f),), eval_paths=(str(f),))
    shards = [_documents_in(list(_ds(cfg, split="eval", seq_len=32, pi=i, pc=3))) for i in range(3)]
    assert sorted(d for s in shards for d in s) == sorted(docs)
    assert all(not set(shards[i]) & set(shards[j]) for i in range(3) for j in range(i))
    # Training shards draw from the same disjoint document sets.
    tr = [_documents_in(_take(_ds(cfg, seq_len=32, pi=i, pc=3), 4)) for i in range(3)]
    assert all(set(tr[i]) <= set(shards[i]) for i in range(3))


def test_eval_fraction_holdout_is_a_partition(tmp_path):
    docs = [f"doc {i}" for i in range(40)]
    cfg = _text_cfg(tmp_path, docs, holdout=True, eval_fraction=0.1)
    train, ev = list(iterate_documents(cfg, "train")), list(iterate_documents(cfg, "eval"))
    assert len(ev) == 4 and sorted(train + ev) == sorted(docs)
    np.testing.assert_array_equal(holdout_indices(40, 0.1, "eval"), holdout_indices(40, 0.1, "eval"))
    with pytest.raises(DataError, match="eval_fraction"):
        list(iterate_documents(DataConfig(**{**cfg.__dict__, "eval_fraction": 0.0}), "eval"))


def test_state_restore_continues_identically(tmp_path):
    cfg = _text_cfg(tmp_path)  # 7 short documents: the 10 batches below cross several epochs
    it = _ds(cfg, seed=7)
    _take(it, 3)
    blob = state_to_bytes(it.get_state())
    json.dumps(it.get_state())  # the trainer stores the raw state as JSON too
    want = _take(it, 10)
    it2 = _ds(cfg, seed=7)
    it2.set_state(state_from_bytes(blob))
    for x, y in zip(want, _take(it2, 10)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------------- sources

def test_text_source_block_and_file_rules(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n second doc \n")
    (tmp_path / "b.txt").write_text("third\n")
    blocks = DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), eval_paths=(str(tmp_path / "b.txt"),))
    assert list(iterate_documents(blocks)) == ["first doc\nline two", " second doc ", "third"]
    files = DataConfig(**{**blocks.__dict__, "text_split": "file"})
    assert list(iterate_documents(files)) == ["first doc\nline two\n\n\n second doc", "third"]


def test_jsonl_source(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "one", "id": 1}\n\n{"body": "two é"}\n{"body": ""}\n')
    cfg = DataConfig(source="jsonl", paths=(str(f),), text_field="body", eval_paths=(str(f),))
    assert list(iterate_documents(cfg)) == ["one", "two é"]
    assert _documents_in(list(_ds(cfg, split="eval"))) == ["one", "two é"]


def test_arrayrecord_source_text_and_json_records(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    f = tmp_path / "d.array_record"
    w = ArrayRecordWriter(str(f), "group_size:1")
    for rec in [b"plain text record", json.dumps({"text": "json record"}).encode(), "ünïcode".encode()]:
        w.write(rec)
    w.close()
    cfg = DataConfig(source="arrayrecord", paths=(str(f),), eval_paths=(str(f),))
    assert list(iterate_documents(cfg)) == ["plain text record", "json record", "ünïcode"]
    assert _documents_in(list(_ds(cfg, split="eval", seq_len=32))) == ["plain text record", "json record", "ünïcode"]
    batch = next(_ds(cfg, seq_len=32))
    assert batch["tokens"].shape == (2, 32)
    bad, empty = tmp_path / "bad.array_record", tmp_path / "empty.array_record"
    w = ArrayRecordWriter(str(bad), "group_size:1")
    w.write(b"fine")
    w.write(b"\xff\xfe")
    w.close()
    ArrayRecordWriter(str(empty), "group_size:1").close()
    with pytest.raises(DataError, match="bad.array_record: record 1: not UTF-8"):
        list(iterate_documents(DataConfig(source="arrayrecord", paths=(str(bad),), eval_paths=(str(bad),))))
    with pytest.raises(DataError, match="empty.array_record: no documents"):
        list(iterate_documents(DataConfig(source="arrayrecord", paths=(str(empty),))))


def test_tfds_source_reads_a_real_tfds_dataset(tmp_path, monkeypatch):
    """A real tensorflow-datasets dataset, built here (a GeneratorBasedBuilder writing array_record files,
    no TensorFlow), read back through data.source=tfds: names, splits, the text field; then the error
    without the package."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class DsjaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"content": tfds.features.Text(), "n": tfds.features.Scalar(np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train", 5), "validation": self._generate_examples("validation", 3)}

        def _generate_examples(self, split, n):
            for i in range(n):
                yield i, {"content": f"{split} example {i}", "n": i}

    DsjaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(source="tfds", tfds_name="dsjax_tiny_text", tfds_data_dir=str(tmp_path), text_field="content",
                     tfds_eval_split="validation")
    assert sorted(iterate_documents(cfg, "eval")) == [f"validation example {i}" for i in range(3)]
    assert sorted(iterate_documents(cfg, "train")) == [f"train example {i}" for i in range(5)]
    assert next(_ds(cfg))["tokens"].shape == (2, 16)
    with pytest.raises(DataError, match="has no field 'text'"):
        list(iterate_documents(dataclasses.replace(cfg, text_field="text")))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match="tensorflow-datasets"):
        list(iterate_documents(cfg))


def test_embedded_corpus_is_deterministic_with_heldout_eval():
    train, ev = embedded_documents("train"), embedded_documents("eval")
    assert len(train) >= 1000 and len(ev) >= 100 and not set(train) & set(ev)
    assert sum(map(len, train)) < 500_000
    embedded_documents.cache_clear()
    assert embedded_documents("train") == train


# ----------------------------------------------------------------------------------- errors

def test_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.txt")
    for src in ("text", "jsonl", "arrayrecord"):
        with pytest.raises(DataError, match="missing.txt: no such file"):
            list(iterate_documents(DataConfig(source=src, paths=(missing,))))
    with pytest.raises(DataError, match=r"nomatch\*\.txt: no file matches"):
        list(iterate_documents(DataConfig(source="text", paths=(str(tmp_path / "nomatch*.txt"),))))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for src in ("text", "jsonl"):
        with pytest.raises(DataError, match="empty.txt: no documents"):
            list(iterate_documents(DataConfig(source=src, paths=(str(empty),))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        list(iterate_documents(DataConfig(source="jsonl", paths=(str(bad),))))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: .*'text'"):
        list(iterate_documents(DataConfig(source="jsonl", paths=(str(nofield),))))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="binary.txt: not UTF-8"):
        list(iterate_documents(DataConfig(source="text", paths=(str(binary),))))


@pytest.mark.parametrize("kw, field", [
    ({"source": "csv"}, "data.source"), ({"source": "text"}, "data.paths"), ({"source": "tfds"}, "data.tfds_name"),
    ({"eval_fraction": 1.5}, "data.eval_fraction"), ({"text_split": "para"}, "data.text_split"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(DataError, match=field):
        DataConfig(**kw)
