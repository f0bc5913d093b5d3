"""Tests of smollm.data: determinism, the split, the cache, every source, and the errors on bad input.

References are computed here independently: documents are read and hashed by the test itself, streams are
rebuilt from `tokenizer.encode` of those documents, MQAR targets are found by scanning the sequences.
"""
import collections
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm import data as sd
from smollm.data import DataError, HFDataset, MQAR, PyStdlib, TextFiles


def in_val(key: str, f: float) -> bool:
    "The split rule, written out independently: sha1 of the key, first 8 bytes, as a fraction of 2**64."
    return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) < f * 2**64


def stream_of(tok_encode, texts, eos):
    out = []
    for t in texts:
        if t: out += tok_encode(t) + [eos]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small(cache):
    "30 standard-library files, a 512-token BPE, 20% validation (so that several files land there)."
    return PyStdlib(vocab_size=512, val_fraction=0.2, max_files=30, cache_dir=cache).prepare()


# --- determinism --------------------------------------------------------------------------------------------

def test_batches_are_a_function_of_seed_step_rank(small, cache):
    args = dict(split="train", step=7, batch_size=4, block_size=64, seed=3, rank=1, world_size=2)
    x, y = small.batch(**args)
    small.batch("train", 0, 8, 32, seed=99)                        # other calls in between change nothing
    fresh = PyStdlib(vocab_size=512, val_fraction=0.2, max_files=30, cache_dir=cache)   # a resumed run
    for other in (small, fresh):
        x2, y2 = other.batch(**args)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for change in ({"step": 8}, {"seed": 4}, {"rank": 0}):
        assert not torch.equal(small.batch(**{**args, **change})[0], x), change


def test_batches_are_shifted_windows_of_the_stream(small):
    x, y = small.batch("train", 0, 8, 48, seed=0)
    assert x.shape == y.shape == (8, 48) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (y != -100).all()                                          # windows never pad
    s = np.asarray(small.tokens("train"), dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = [i for i in np.flatnonzero(s[:len(s) - 48] == row_x[0]) if (s[i:i + 48] == row_x).all()]
        assert any(s[i + 48] == row_y[-1] for i in starts)


def test_validation_set_is_fixed_non_overlapping_and_shared_by_ranks(small):
    vb = small.val_batches(4, batch_size=3, block_size=32)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vb, small.val_batches(4, 3, 32)))
    assert torch.equal(small.batch("val", 2, 3, 32, seed=1234)[0], vb[2][0])    # the seed does not matter
    rows = torch.cat([x for x, _ in vb]).numpy()
    v = np.asarray(small.tokens("val"), dtype=np.int64)
    starts = set()
    for r in rows:  # each row is a window at a multiple of block_size + 1: the windows cannot overlap
        hits = [i for i in range(0, len(v) - 32, 33) if (v[i:i + 32] == r).all()]
        assert hits
        starts.add(hits[0])
    assert len(starts) == 12
    # two ranks at steps 0, 1 together see exactly the batches 0..3 of one process
    ddp = [small.batch("val", step, 3, 32, seed=0, rank=r, world_size=2) for step in (0, 1) for r in (0, 1)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ddp, vb))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_ranks_take_disjoint_slices_of_one_global_batch(small, split, world_size):
    "The ranks' batches, stacked in rank order, are the batch of one process with batch_size x world_size rows."
    for source, T in ((small, 32), (MQAR(vocab_size=64, num_kv_pairs=4), 24)):
        one = source.batch(split, 5, 2 * world_size, T, seed=3)
        ranks = [source.batch(split, 5, 2, T, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
        for i in (0, 1):
            assert torch.equal(torch.cat([b[i] for b in ranks]), one[i]), (source.kind, i)
        val = [source.val_batches(2, 2, T, rank=r, world_size=world_size) for r in range(world_size)]
        for step, (x, y) in enumerate(source.val_batches(2, 2 * world_size, T)):
            assert torch.equal(torch.cat([v[step][0] for v in val]), x)
            assert torch.equal(torch.cat([v[step][1] for v in val]), y)


def test_one_process_draws_what_it_always_drew(small):
    "World size 1 keeps the draws of the rank-seeded generators (rank 0), so that older runs resume exactly."
    s = np.asarray(small.tokens("train"), dtype=np.int64)
    starts = torch.randint(0, len(s) - 48, (6,), generator=sd.seeded_generator("train", 4, 9, 0)).tolist()
    assert small.batch("train", 9, 6, 48, seed=4)[0].tolist() == [s[i:i + 48].tolist() for i in starts]
    mq = MQAR(vocab_size=64, num_kv_pairs=4, power_a=0.1)
    for split, digest in (("train", "76ed06aeb1340458"), ("val", "09b505fdde666962")):   # made before the change
        x, y = mq.batch(split, 1, 8, 24, seed=0)
        assert hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16] == digest


# --- the split and the stream --------------------------------------------------------------------------------

def test_split_is_by_file_and_streams_hold_each_file_then_eos(small):
    files = small.files()
    texts = {f: (small.root / f).read_text(encoding="utf-8") for f in files}
    val = [f for f in files if in_val(f, 0.2)]
    train = [f for f in files if not in_val(f, 0.2)]
    assert val and train
    enc = small.encode
    assert small.tokens("train").tolist() == stream_of(enc, [texts[f] for f in train], small.eos_id)
    assert small.tokens("val").tolist() == stream_of(enc, [texts[f] for f in val], small.eos_id)


def test_split_is_stable_when_files_come_and_go():
    keys = [f"lib/m{i}.py" for i in range(300)]
    s = sd.split_documents(keys, 0.05)
    assert [k for k, v in zip(keys, s) if v == "val"] == [k for k in keys if in_val(k, 0.05)]
    s2 = sd.split_documents(keys[50:] + ["new/a.py", "new/b.py"], 0.05)
    assert s2[:250] == s[50:]


def test_default_file_list_leaves_out_tests_and_packages(cache):
    files = PyStdlib(cache_dir=cache).files()
    assert len(files) > 300 and "os.py" in files and "json/decoder.py" in files
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(skip & set(f.split("/")[:-1]) for f in files)
    assert all(f.endswith(".py") for f in files)


# --- the cache -----------------------------------------------------------------------------------------------

def test_cache_is_reused_not_rebuilt(small, cache, monkeypatch):
    stamp = {p.name: p.stat().st_mtime_ns for p in small.cache_path.iterdir()}
    calls = []
    monkeypatch.setattr(sd, "train_bpe", lambda *a, **k: calls.append(1))   # any retraining would show
    again = PyStdlib(vocab_size=512, val_fraction=0.2, max_files=30, cache_dir=cache).prepare()
    assert again.from_cache and not calls and again.cache_path == small.cache_path
    assert {p.name: p.stat().st_mtime_ns for p in small.cache_path.iterdir()} == stamp
    assert again.vocab_size == small.vocab_size and again.describe().split()[-1] == str(small.cache_path)


def test_cache_key_follows_the_settings(small, cache):
    same = dict(vocab_size=512, val_fraction=0.2, max_files=30, cache_dir=cache)
    assert PyStdlib(**same).cache_path == small.cache_path
    for change in ({"vocab_size": 600}, {"val_fraction": 0.1}, {"max_files": 31}):
        assert PyStdlib(**{**same, **change}).cache_path != small.cache_path, change


def test_an_interrupted_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    src = PyStdlib(vocab_size=300, max_files=6, cache_dir=tmp_path)

    def killed(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(sd, "write_tokens", killed)
    with pytest.raises(KeyboardInterrupt): src.prepare()
    assert not src.cache_path.exists() and not list(tmp_path.glob("*.tmp-*"))
    monkeypatch.undo()
    src = PyStdlib(vocab_size=300, max_files=6, cache_dir=tmp_path).prepare()
    assert src.from_cache is False
    # a damaged cache (a truncated token file) is rebuilt, not trusted
    with open(src.cache_path / "train.bin", "r+b") as f: f.truncate(10)
    again = PyStdlib(vocab_size=300, max_files=6, cache_dir=tmp_path).prepare()
    assert again.from_cache is False and len(again.tokens("train")) == len(src.tokens("train"))


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "c"))
    assert PyStdlib().cache_dir == tmp_path / "c"
    monkeypatch.delenv("SMOLLM_CACHE")
    assert PyStdlib().cache_dir == Path("~/.cache/smollm").expanduser()


# --- other sources -------------------------------------------------------------------------------------------

def docs_of(src):
    "The documents in the two streams, recovered by decoding and splitting at eos."
    text = src.decode(src.tokens("train").tolist()) + src.decode(src.tokens("val").tolist())
    return sorted(d for d in text.split("<|eos|>") if d)


def test_text_files_txt_jsonl_parquet(tmp_path):
    import datasets
    cache, tmp_path = tmp_path / "cache", tmp_path / "in"
    tmp_path.mkdir()
    txt = [f"# file {i}\nprint('hello {i}')\n" * 5 for i in range(3)]
    for i, t in enumerate(txt): (tmp_path / f"t{i}.txt").write_text(t)
    rows = [f"row {i}: é ü 🐍\n" * 3 for i in range(12)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"body": r, "n": i}) + "\n" for i, r in enumerate(rows)))
    table = [f"parquet {i}\n" * 4 for i in range(7)]
    datasets.Dataset.from_dict({"body": table}).to_parquet(str(tmp_path / "p.parquet"))
    src = TextFiles([tmp_path / "t0.txt", tmp_path / "t1.txt", tmp_path / "t2.txt", tmp_path / "r.jsonl",
                     str(tmp_path / "p.parquet")], text_field="body", vocab_size=300, cache_dir=cache)
    assert docs_of(src) == sorted(txt + rows + table)
    assert src._meta["n_docs"]["train"] + src._meta["n_docs"]["val"] == 22
    # the jsonl rows are split by their own key, path#row
    val_rows = {r for i, r in enumerate(rows) if in_val(f"r.jsonl#{i}", 0.05)}
    assert val_rows <= set(src.decode(src.tokens("val").tolist()).split("<|eos|>"))
    # a folder is searched for the same extensions
    folder = TextFiles([tmp_path], text_field="body", vocab_size=300, cache_dir=cache)
    assert [k for k, _ in folder.files] == [f"{tmp_path.name}/{n}" for n in ("p.parquet", "r.jsonl", "t0.txt", "t1.txt", "t2.txt")]


def test_a_single_document_is_cut_into_train_and_val(tmp_path):
    text = "".join(f"line {i} of the only file\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    src = TextFiles([tmp_path / "one.txt"], vocab_size=300, val_fraction=0.1, cache_dir=tmp_path)
    whole = src.encode(text) + [src.eos_id]
    tr, va = src.tokens("train").tolist(), src.tokens("val").tolist()
    assert tr + va == whole and abs(len(va) - 0.1 * len(whole)) <= 1


def test_hf_through_a_monkeypatched_load_dataset(tmp_path, monkeypatch):
    import datasets
    texts = [f"def f{i}():\n    return {i}\n" for i in range(25)]
    seen = {}

    def fake(name, config=None, split=None, **kw):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"content": texts, "n": list(range(25))})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    src = HFDataset("someone/python-snippets", config="py", split="train[:50%]", text_field="content",
                    vocab_size=300, cache_dir=tmp_path)
    assert docs_of(src) == sorted(texts)
    assert seen == {"name": "someone/python-snippets", "config": "py", "split": "train[:50%]"}
    val = [t for i, t in enumerate(texts) if in_val(str(i), 0.05)] or None
    if val: assert src.tokens("val").tolist() == stream_of(src.encode, val, src.eos_id)
    # max_docs keeps the first rows
    few = HFDataset("someone/python-snippets", text_field="content", vocab_size=300, cache_dir=tmp_path, max_docs=10)
    assert docs_of(few) == sorted(texts[:10])
    # bad rows and bad splits are named
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"content": ["a", None]}))
    with pytest.raises(DataError, match="row 1"):
        HFDataset("x/none", text_field="content", vocab_size=300, cache_dir=tmp_path).prepare()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}))
    with pytest.raises(DataError, match="data.split"):
        HFDataset("x/dict", split=None, vocab_size=300, cache_dir=tmp_path).prepare()


def test_hf_from_a_local_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    texts = [f"x{i} = {i} * 2\n" for i in range(20)]
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    src = HFDataset(str(tmp_path / "ds"), vocab_size=300, cache_dir=tmp_path / "cache")
    assert docs_of(src) == sorted(texts)


def test_pretrained_tokenizer(tmp_path, cache, small):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["import os\nprint(os.getcwd())\n"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    src = PyStdlib(vocab_size=512, val_fraction=0.2, max_files=30, tokenizer_path=str(path), cache_dir=cache)
    assert src.cache_path != small.cache_path
    assert (src.bos_id, src.eos_id, src.pad_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("<unk>"))
    assert src.vocab_size == tok.get_vocab_size()
    first = next(f for f in src.files() if not in_val(f, 0.2) and (src.root / f).stat().st_size)
    ids = tok.encode((src.root / first).read_text(), add_special_tokens=False).ids + [tok.token_to_id("</s>")]
    assert src.tokens("train")[:len(ids)].tolist() == ids
    # named special tokens, and the errors
    named = PyStdlib(max_files=3, tokenizer_path=str(path), eos_token="<s>", cache_dir=cache)
    assert named.eos_id == tok.token_to_id("<s>")
    with pytest.raises(DataError, match="<eot>"):
        PyStdlib(max_files=3, tokenizer_path=str(path), eos_token="<eot>", cache_dir=cache).prepare()
    with pytest.raises(DataError, match=r"has \d+ tokens, more than data.vocab_size=100"):
        PyStdlib(vocab_size=100, max_files=3, tokenizer_path=str(path), cache_dir=cache).prepare()
    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(DataError, match="bare.json.*eos_token"):
        PyStdlib(max_files=3, tokenizer_path=str(tmp_path / "bare.json"), cache_dir=cache).prepare()


# --- bad input -----------------------------------------------------------------------------------------------

def test_bad_input_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "rows.jsonl").write_text('{"body": "hi"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "hi"\n')
    (tmp_path / "nothing").mkdir()
    kw = dict(vocab_size=300, cache_dir=tmp_path / "cache")
    cases = [
        (lambda: TextFiles([tmp_path / "latin1.txt"], **kw).prepare(), r"latin1\.txt: not UTF-8"),
        (lambda: TextFiles([tmp_path / "latin1.jsonl"], **kw).prepare(), r"latin1\.jsonl: not UTF-8"),
        (lambda: TextFiles([tmp_path / "empty.txt"], **kw).prepare(), r"empty\.txt.*empty"),
        (lambda: TextFiles([], **kw), "data.paths is empty"),
        (lambda: TextFiles([tmp_path / "missing.txt"], **kw), r"missing\.txt does not exist"),
        (lambda: TextFiles([tmp_path / "nothing"], **kw), r"nothing holds no \.txt"),
        (lambda: TextFiles([tmp_path / "data.csv"], **kw), r"data\.csv has the unknown extension '\.csv'; accepted: \.txt"),
        (lambda: TextFiles([tmp_path / "rows.jsonl"], **kw).prepare(), r"rows\.jsonl: has no field 'text'.*\['body'\]"),
        (lambda: TextFiles([tmp_path / "broken.jsonl"], **kw).prepare(), r"broken\.jsonl: could not be read as json"),
        (lambda: TextFiles([tmp_path / "tiny.txt"], **kw).batch("train", 0, 2, 64, seed=0), r"tiny\.txt: the train split has \d+ tokens"),
        (lambda: PyStdlib(tokenizer_path=str(tmp_path / "tok.json"), cache_dir=tmp_path), r"tok\.json' does not exist"),
        (lambda: PyStdlib(val_fraction=1.5), "val_fraction=1.5"),
        (lambda: PyStdlib(vocab_size=100), "vocab_size=100.*259"),
        (lambda: PyStdlib(max_files=0), "max_files=0"),
        (lambda: HFDataset("", cache_dir=tmp_path), "data.name is empty"),
        (lambda: MQAR(vocab_size=10, num_kv_pairs=8), "vocab_size=10"),
        (lambda: MQAR(power_a=0), "power_a=0"),
        (lambda: MQAR(num_kv_pairs=8).batch("train", 0, 2, 20, seed=0), "block_size=20"),
        (lambda: MQAR(seq_len=64).batch("train", 0, 2, 128, seed=0), "seq_len=64"),
        (lambda: MQAR().batch("test", 0, 2, 64, seed=0), "split='test'"),
        (lambda: MQAR().batch("train", 0, 2, 64, seed=0, rank=2, world_size=2), "rank=2"),
        (lambda: MQAR().encode("x"), "no text tokenizer"),
    ]
    for fn, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            fn()
    assert issubclass(DataError, ValueError)


# --- MQAR ----------------------------------------------------------------------------------------------------

def scan_targets(x, n_pairs):
    "MQAR targets found by scanning each sequence: after the pairs, a key seen in them is followed by its value."
    y = torch.full_like(x, -100)
    for b, row in enumerate(x.tolist()):
        value_of = {}
        for i in range(0, 2 * n_pairs, 2): value_of.setdefault(row[i], row[i + 1])
        for t in range(2 * n_pairs, len(row)):
            if row[t] in value_of: y[b, t] = value_of[row[t]]
    return y


@pytest.mark.parametrize("V,D,T,a", [(64, 4, 32, 0.1), (8192, 16, 128, 0.01), (100, 20, 60, 1.0)])
def test_mqar_targets_only_at_queries(V, D, T, a):
    mq = MQAR(vocab_size=V, num_kv_pairs=D, power_a=a)
    x, y = mq.batch("train", 5, 32, T, seed=1)
    assert x.shape == y.shape == (32, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, scan_targets(x, D))
    assert ((y != -100).sum(1) == D).all()                            # every key queried exactly once
    keys, vals = x[:, 0:2 * D:2], x[:, 1:2 * D:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((vals >= V // 2) & (vals < V)).all()
    assert all(len(set(r)) == D for r in keys.tolist())               # distinct keys
    rest = x[:, 2 * D:]
    assert ((rest == 0) | (y[:, 2 * D:] != -100)).all()               # filler except at the queries
    assert torch.equal(mq.batch("train", 5, 32, T, seed=1)[0], x)
    assert not torch.equal(mq.batch("train", 6, 32, T, seed=1)[0], x)
    assert not torch.equal(mq.batch("train", 5, 32, T, seed=2)[0], x)
    assert not torch.equal(mq.batch("train", 5, 32, T, seed=1, rank=1, world_size=2)[0], x)
    assert torch.equal(mq.val_batches(2, 32, T)[1][0], mq.batch("val", 1, 32, T, seed=77)[0])
    assert mq.metric == "accuracy" and mq.tokenizer is None and mq.eos_id is None
    assert math.isclose(sd.unigram_loss(mq), math.log(V - V // 2))


def test_mqar_power_law_puts_most_queries_early():
    x, y = MQAR(vocab_size=1024, num_kv_pairs=8, power_a=0.01).batch("train", 0, 512, 256, seed=0)
    slot = ((y != -100).nonzero()[:, 1] - 16).float()
    x2, y2 = MQAR(vocab_size=1024, num_kv_pairs=8, power_a=1.0).batch("train", 0, 512, 256, seed=0)
    slot_uniform = ((y2 != -100).nonzero()[:, 1] - 16).float()
    assert slot.median() < 0.5 * slot_uniform.median()
    assert 80 < slot_uniform.mean() < 160                             # power_a = 1: uniform over 240 slots


# --- the baseline and configs --------------------------------------------------------------------------------

def test_unigram_loss_against_a_direct_count(small):
    train, val = small.tokens("train").tolist(), small.tokens("val").tolist()
    V, c = small.vocab_size, collections.Counter(train)
    ref = -sum(math.log((c[t] + 1) / (len(train) + V)) for t in val) / len(val)
    assert math.isclose(sd.unigram_loss(small), ref, rel_tol=1e-9)


def test_build_data_from_the_yaml_files(small, cache, monkeypatch):
    from omegaconf import OmegaConf
    conf = Path(__file__).resolve().parent.parent / "conf" / "data"
    monkeypatch.setenv("SMOLLM_CACHE", str(cache))
    cfg = OmegaConf.load(conf / "pystdlib.yaml")
    cfg.vocab_size, cfg.val_fraction, cfg.max_files = 512, 0.2, 30
    src = sd.build_data(OmegaConf.create({"data": cfg, "model": {"vocab_size": "${data.vocab_size}"}}))
    assert type(src) is PyStdlib and src.cache_path == small.cache_path
    tf = OmegaConf.load(conf / "text_files.yaml")
    tf.paths = [str(Path(__file__))]
    with pytest.raises(DataError, match="unknown extension '.py'"):
        sd.build_data(tf)
    assert type(sd.build_data(OmegaConf.load(conf / "mqar.yaml"))) is MQAR
    for name in ("pystdlib", "text_files", "hf", "mqar"):
        assert "vocab_size" in OmegaConf.load(conf / f"{name}.yaml")
