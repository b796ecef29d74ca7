"""Shard specs and reading: every kind of bad input becomes a reason, good samples around it survive."""

import pytest
from helpers import bad_samples, demo_samples, png_bytes, strip_none, truncate, write_tar

from capfilt import CapfiltError
from capfilt.data import reader
from capfilt.data.reader import ShardStream, expand_specs, read_shard, shard_name


def test_expand_specs_accepts_files_dirs_globs_braces_urls(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"data-{i:06d}.tar", demo_samples(1))
    one = str(tmp_path / "data-000000.tar")
    assert expand_specs([one]) == [one]
    assert len(expand_specs([str(tmp_path)])) == 3
    assert len(expand_specs([str(tmp_path / "data-*.tar")])) == 3
    assert expand_specs([str(tmp_path / "data-{000001..000002}.tar")]) == [
        str(tmp_path / "data-000001.tar"), str(tmp_path / "data-000002.tar")]
    assert expand_specs([f"pipe:cat {one}"]) == [f"pipe:cat {one}"]
    assert expand_specs([one, one]) == [one]  # the same shard twice is read once


@pytest.mark.parametrize("spec", ["missing.tar", "nothing-*.tar", "d-{000..002}.tar"])
def test_expand_specs_reports_no_match(tmp_path, spec):
    with pytest.raises(CapfiltError, match="no input matched"):
        expand_specs([str(tmp_path / spec)])


def test_expand_specs_refuses_output_name_clash(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_tar(tmp_path / sub / "x.tar", demo_samples(1))
    with pytest.raises(CapfiltError, match="same output"):
        expand_specs([str(tmp_path / "a"), str(tmp_path / "b")])


def test_shard_names():
    assert shard_name("/d/data-000001.tar") == "data-000001"
    assert shard_name("https://host/x/shard-1.tar?sig=abc") == "shard-1"
    assert shard_name("pipe:aws s3 cp s3://bucket/p/shard-7.tar -") == "shard-7"


def test_bad_samples_get_reasons_and_good_ones_survive(tmp_path):
    path = write_tar(tmp_path / "bad.tar", strip_none(bad_samples()))
    stream = ShardStream([str(path)], {"id": lambda image: {"x": __import__("torch").zeros(1, 1)}}, 4)
    batches = [b for b in stream if isinstance(b, reader.Batch)]
    samples = [s for b in batches for s in b.samples]
    reasons = {s.key: s.error for s in samples}
    assert reasons == {
        "good0": None, "corrupt": "corrupt_image", "truncjpg": "corrupt_image", "nocaption": None,
        "latin1": "caption_not_utf8", "noimage": "no_image", "good1": None, "jsoncap": None,
    }
    assert next(s for s in samples if s.key == "jsoncap").web_caption == "a cat on a table"
    image_only = next(s for s in samples if s.key == "nocaption")  # usable: a captioner captions the image alone
    assert image_only.web_caption is None and image_only.detail == "no txt member and no caption in json"
    # Pixel rows line up with the decoded samples.
    for b in batches:
        ok = [s for s in b.samples if s.error is None]
        assert [s.input_row for s in ok] == list(range(len(ok)))
        assert len(b.inputs["id"]) == len(ok)


def test_the_dataloader_pins_every_batch_tensor(tmp_path, monkeypatch):
    """With pin_memory the DataLoader's pin thread must reach the tensors inside capfilt's batch dataclasses (it
    leaves objects it does not know unpinned), or host-to-GPU copies are neither fast nor non-blocking."""
    import torch
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin  # what the pin thread calls

    from capfilt.data.pairs import PairStream

    pinned = []

    def fake_pin(tensor):  # the real one needs an accelerator
        pinned.append(tensor.data_ptr())
        return tensor.clone()

    path = write_tar(tmp_path / "demo.tar", demo_samples(6))
    def transform(images):
        return torch.zeros(len(images), 3, 4, 4)

    def preprocess(image):
        return {"pixel_values": torch.zeros(1, 3, 4, 4), "input_ids": torch.ones(1, 5, dtype=torch.long)}

    stream = ShardStream([str(path)], {"a": preprocess, "b": preprocess}, 4)
    batch = next(b for b in stream if isinstance(b, reader.Batch))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = dataloader_pin(batch)
    assert isinstance(out, reader.Batch) and out.samples == batch.samples
    assert sorted(pinned) == sorted(t.data_ptr() for rows in batch.inputs.values() for one in rows
                                    for t in one.values())
    assert out.inputs.keys() == batch.inputs.keys() and all(len(out.inputs[k]) == 4 for k in out.inputs)

    def tokenize(b):
        return dict(pixel_values=b.pixel_values, input_ids=torch.ones(len(b.captions), 5, dtype=torch.long))

    pairs = next(iter(PairStream([str(path)], transform, 3, resampled=False, tokenize=tokenize)))
    pinned.clear()
    out = dataloader_pin(pairs)
    assert out.captions == pairs.captions and out.inputs["pixel_values"] is out.pixel_values  # copied once
    assert sorted(pinned) == sorted(t.data_ptr() for t in (pairs.pixel_values, pairs.sample_ids,
                                                           pairs.inputs["input_ids"]))


def test_shards_of_one_name_in_two_folders_are_other_images(tmp_path):
    """img2dataset names every folder's first shard 00000.tar with the same keys: pre-training on two such
    folders must not take them for one image (ITM's same-image rule, the frozen-feature cache)."""
    import torch

    from capfilt.data.pairs import PairStream

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "00000.tar", demo_samples(2))
    urls = reader.expand_specs([str(tmp_path / "a"), str(tmp_path / "b")], outputs=False)
    with pytest.raises(CapfiltError, match="same output"):
        reader.expand_specs([str(tmp_path / "a"), str(tmp_path / "b")])  # a per-shard writer must refuse them
    batch = next(iter(PairStream(urls, lambda images: torch.zeros(len(images), 3, 4, 4), 4, resampled=False)))
    assert len(set(batch.sample_ids.tolist())) == 4


def test_truncated_tar_keeps_what_came_before(tmp_path):
    path = truncate(write_tar(tmp_path / "t.tar", demo_samples(10)), 0.5)
    samples = list(read_shard(str(path)))
    good = [s for s in samples if s.error is None]
    assert 3 <= len(good) < 10
    assert samples[-1].key == "" and samples[-1].error == "truncated_tar"


def test_empty_and_garbage_tars(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    write_tar(tmp_path / "nomembers.tar", [])
    for name, reason in [("empty", "empty_tar"), ("garbage", "unreadable_tar"), ("nomembers", "empty_tar")]:
        samples = list(read_shard(str(tmp_path / f"{name}.tar")))
        assert [(s.key, s.error) for s in samples] == [("", reason)], name


def test_png_and_pipe_urls(tmp_path):
    path = write_tar(tmp_path / "p.tar", [{"__key__": "k1", "png": png_bytes(), "txt": b"a red square"}])
    samples = list(read_shard(f"pipe:cat {path}"))
    assert [(s.key, s.image_ext, s.web_caption, s.error) for s in samples] == [("k1", "png", "a red square", None)]


def test_unopenable_shard_is_retried_then_reported(tmp_path):
    stream = ShardStream([str(tmp_path / "gone.tar")], {}, 4, retries=1, retry_wait_s=0.0)
    assert [(e.shard, bool(e.failed), e.retrying) for e in stream] == [("gone", True, True), ("gone", True, False)]


def _member_offsets(path):
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


@pytest.mark.parametrize("where", ["inside a header", "at a header", "inside data"])
def test_a_tar_cut_anywhere_ends_with_a_truncated_tar_row(tmp_path, where):
    """A download cut inside a member header (or just before one) must not pass for a complete shard: the samples
    before the cut survive, the one being read is flagged, and the shard says it was truncated."""
    samples = demo_samples(3)
    path = write_tar(tmp_path / "t.tar", samples)
    json_member = _member_offsets(path)[f"{samples[2]['__key__']}.json"]  # the last sample's second member
    cut = {"inside a header": json_member + 100, "at a header": json_member, "inside data": json_member - 100}
    path.write_bytes(path.read_bytes()[: cut[where]])
    read = [(s.key, s.error) for s in read_shard(str(path))]
    keys = [s["__key__"] for s in samples]
    assert read == [(keys[0], None), (keys[1], None), (keys[2], "truncated_tar"), ("", "truncated_tar")]


def test_a_repeated_key_makes_the_later_sample_a_duplicate_key_error(tmp_path):
    a, b, c = demo_samples(3)
    second_a = {**a, "txt": b"another caption under the same key"}
    path = write_tar(tmp_path / "dup.tar", [a, b, second_a, c, {**c, "txt": b"and again"}])
    read = list(read_shard(str(path)))
    assert [(s.key, s.error) for s in read] == [(a["__key__"], None), (b["__key__"], None),
                                               (a["__key__"], "duplicate_key"), (c["__key__"], None),
                                               (c["__key__"], "duplicate_key")]
    assert read[0].web_caption == a["txt"].decode().strip()  # the first one stays as it was, not overwritten
    assert read[3].web_caption == c["txt"].decode().strip()


def test_image_only_samples_are_usable_and_say_why_they_have_no_web_caption(tmp_path):
    jpg = demo_samples(1)[0]["jpg"]
    path = write_tar(tmp_path / "img.tar", [
        {"__key__": "bare", "jpg": jpg},
        {"__key__": "jsonnocap", "jpg": jpg, "json": b'{"url": "http://x/1.jpg", "caption": null}'},
        {"__key__": "emptytxt", "jpg": jpg, "txt": b"  \n"},
        {"__key__": "emptyjson", "jpg": jpg, "json": b'{"caption": ""}'},
    ])
    read = {s.key: s for s in read_shard(str(path))}
    assert all(s.error is None and s.web_caption is None and s.image == jpg for s in read.values())
    assert {k: s.detail for k, s in read.items()} == {
        "bare": "no txt member and no caption in json", "jsonnocap": "no txt member and no caption in json",
        "emptytxt": "the txt member is empty", "emptyjson": "the json caption is empty"}
