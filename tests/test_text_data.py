"""Tests for transformer.dataset: corpus reading, the train/test split, crops and batching."""

import os
import re
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sam_eos.errors import InputError
from transformer import dataset

ASCII_NO_NUL = st.characters(min_codepoint=1, max_codepoint=127)
NON_ASCII = st.characters(min_codepoint=128, exclude_categories=("Cs",))


def numbered_lines(n: int) -> str:
    """n lines '0000\\n', '0001\\n', ...: with sequence_length=4 each crop is one line, so a
    crop's identity is the number it spells."""
    return "".join(f"{i:04d}\n" for i in range(n))


def crop_ids(inputs: np.ndarray) -> np.ndarray:
    """Crop numbers of a batch of `numbered_lines` crops (inputs [..., 4] = the 4 digits)."""
    digits = inputs[..., :4] - ord("0")
    return digits @ np.array([1000, 100, 10, 1])


def write_bytes(data: bytes) -> str:
    """Writes data to a fresh temporary file (safe inside hypothesis examples); returns its path."""
    fd, path = tempfile.mkstemp(suffix=".txt")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- read_ascii_text


def test_reads_ascii_file(tmp_path):
    text = "Hello, world!\r\nSecond line\twith tab\n~\x7f\x01"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("ascii"))
    assert dataset.read_ascii_text(str(path)) == text


def test_empty_file_reads_as_empty_text(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert dataset.read_ascii_text(str(path)) == ""


def test_missing_file_is_rejected(tmp_path):
    path = str(tmp_path / "no_such_corpus.txt")
    with pytest.raises(InputError, match="does not exist") as info:
        dataset.read_ascii_text(path)
    assert path in str(info.value)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(InputError, match="is a directory") as info:
        dataset.read_ascii_text(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_bytes(b"abc")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dataset, "open", refuse, raising=False)  # (tests run as root here)
    with pytest.raises(InputError, match="Cannot read corpus file .*: Permission denied") as info:
        dataset.read_ascii_text(str(path))
    assert str(path) in str(info.value)


def test_nul_byte_is_rejected_with_position(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"first\nsec\x00ond\n")  # offset 9 = line 2, column 4
    with pytest.raises(InputError) as info:
        dataset.read_ascii_text(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "NUL" in message and "reserved for padding" in message
    assert "byte offset 9 (line 2, column 4)" in message


def test_non_ascii_is_rejected_with_position(tmp_path):
    path = tmp_path / "accent.txt"
    path.write_text("ab\ncdé\n", encoding="utf-8")  # 'é' starts at byte 5 = line 2, column 3
    with pytest.raises(InputError) as info:
        dataset.read_ascii_text(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "non-ASCII" in message
    assert "byte offset 5 (line 2, column 3)" in message


def test_first_offence_is_reported(tmp_path):
    path = tmp_path / "both.txt"
    path.write_bytes(b"\xff\x00")
    first = r"non-ASCII byte 0xff at byte offset 0 \(line 1, column 1\)"
    with pytest.raises(InputError, match=first):
        dataset.read_ascii_text(str(path))
    path.write_bytes(b"\n\n\x00\xff")
    with pytest.raises(InputError, match=r"NUL byte at byte offset 2 \(line 3, column 1\)"):
        dataset.read_ascii_text(str(path))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=ASCII_NO_NUL, max_size=300))
def test_ascii_without_nul_round_trips(text):
    path = write_bytes(text.encode("ascii"))
    try:
        assert dataset.read_ascii_text(path) == text
    finally:
        os.remove(path)


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.text(alphabet=ASCII_NO_NUL, max_size=200),
    bad=st.one_of(st.just("\x00"), NON_ASCII),
    suffix=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=50),
)
def test_first_nul_or_non_ascii_is_reported_at_its_position(prefix, bad, suffix):
    path = write_bytes((prefix + bad + suffix).encode("utf-8"))
    try:
        with pytest.raises(InputError) as info:
            dataset.read_ascii_text(path)
    finally:
        os.remove(path)
    message = str(info.value)
    offset = len(prefix)  # the prefix is ASCII, so byte offset == character index
    line = prefix.count("\n") + 1
    column = offset - (prefix.rfind("\n") + 1) + 1
    assert path in message
    assert f"byte offset {offset} (line {line}, column {column})" in message
    if bad == "\x00":
        assert "NUL byte" in message and "reserved for padding" in message
    else:
        assert "non-ASCII byte" in message


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=100))
def test_any_text_with_nul_or_non_ascii_is_rejected(text):
    path = write_bytes(text.encode("utf-8"))
    try:
        if all(0 < ord(c) < 128 for c in text):
            assert dataset.read_ascii_text(path) == text
        else:
            with pytest.raises(InputError, match="NUL byte|non-ASCII byte") as info:
                dataset.read_ascii_text(path)
            assert path in str(info.value)
    finally:
        os.remove(path)


# -------------------------------------------------------------------------------- split_corpus


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_split_holds_out_last_lines(trailing_newline):
    lines = [f"line {i}" for i in range(15)]
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    train, test = dataset.split_corpus(text, test_lines=4)
    assert train + test == text
    assert train == "".join(f"line {i}\n" for i in range(11))
    assert test.splitlines() == ["line 11", "line 12", "line 13", "line 14"]


def test_split_only_counts_newlines_as_line_breaks():
    text = "a\rb\x0cc\nd\ne\n"  # '\r' and form feed do not end lines
    train, test = dataset.split_corpus(text, test_lines=2)
    assert (train, test) == ("a\rb\x0cc\n", "d\ne\n")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=ASCII_NO_NUL, max_size=200), st.integers(1, 10))
def test_split_concatenates_back(text, test_lines):
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)  # '\n'-terminated lines, plus an unended one
    if len(lines) <= test_lines:
        with pytest.raises(InputError, match=f"only {len(lines)} lines"):
            dataset.split_corpus(text, test_lines)
        return
    train, test = dataset.split_corpus(text, test_lines)
    assert train + test == text
    assert train == "".join(lines[:-test_lines])
    assert test == "".join(lines[-test_lines:])


def test_split_rejects_too_few_lines():
    with pytest.raises(InputError, match="only 4 lines") as info:
        dataset.split_corpus("a\nb\nc\nd\n", test_lines=4)
    assert "--test_lines" in str(info.value)
    with pytest.raises(InputError, match="only 0 lines"):
        dataset.split_corpus("", test_lines=1)
    with pytest.raises(InputError, match="--test_lines"):
        dataset.split_corpus("a\nb\n", test_lines=0)


# ------------------------------------------------------------------------------ encode / crops


def test_encode_gives_ascii_codes():
    codes = dataset.encode("Az\n~")
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, [65, 122, 10, 126])


def test_crops_are_non_overlapping_and_drop_the_tail():
    crops = dataset.make_crops("abcdefghij", sequence_length=2)
    assert crops.dtype == np.int32 and crops.shape == (3, 3)
    assert ["".join(map(chr, row)) for row in crops] == ["abc", "def", "ghi"]
    assert dataset.make_crops("ab", sequence_length=2).shape == (0, 3)
    with pytest.raises(InputError, match="--sequence_length"):
        dataset.make_crops("abc", sequence_length=0)


# ------------------------------------------------------------------------------- TrainBatches


def test_train_batches_inputs_and_targets_are_shifted_crops():
    batches = dataset.TrainBatches(numbered_lines(50), batch_size=4, sequence_length=4, seed=0)
    crops = dataset.make_crops(numbered_lines(50), 4)
    for _ in range(30):
        inputs, targets = next(batches)
        assert inputs.shape == targets.shape == (4, 4)
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        np.testing.assert_array_equal(targets[:, -1], ord("\n"))
        rebuilt = np.concatenate([inputs, targets[:, -1:]], axis=1)
        np.testing.assert_array_equal(rebuilt, crops[crop_ids(inputs)])


def test_train_batches_are_deterministic_per_seed():
    text = numbered_lines(200)

    def stream(seed):
        return dataset.TrainBatches(text, batch_size=8, sequence_length=4, seed=seed).take(60)

    a_inputs, a_targets = stream(3)
    b_inputs, b_targets = stream(3)
    np.testing.assert_array_equal(a_inputs, b_inputs)
    np.testing.assert_array_equal(a_targets, b_targets)
    c_inputs, _ = stream(4)
    assert not np.array_equal(a_inputs, c_inputs)


@pytest.mark.parametrize("shuffle_buffer_batches", [1, 3, 10, 100])
def test_each_epoch_uses_every_usable_crop_once(shuffle_buffer_batches):
    # 103 crops, batches of 10: 10 batches per epoch over crops 0..99; crops 100-102 are the tail.
    batches = dataset.TrainBatches(
        numbered_lines(103),
        batch_size=10,
        sequence_length=4,
        seed=1,
        shuffle_buffer_batches=shuffle_buffer_batches,
    )
    assert batches.num_batches_per_epoch == 10
    for _ in range(3):
        ids = np.concatenate([crop_ids(next(batches)[0]) for _ in range(10)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(100))
        assert not np.array_equal(ids, np.arange(100))  # shuffled


def test_shuffle_buffer_limits_how_far_ahead_a_crop_can_come_out():
    # A crop enters the buffer only once the crops before it have filled it: with a buffer of
    # 10 crops, the crop emitted t-th (0-based) within an epoch has number <= t + 9.
    batches = dataset.TrainBatches(
        numbered_lines(1000), batch_size=10, sequence_length=4, seed=0, shuffle_buffer_batches=1
    )
    inputs, _ = batches.take(100)
    ids = crop_ids(inputs).reshape(-1)
    assert np.all(ids <= np.arange(1000) + 9)
    assert np.max(ids - np.arange(1000)) == 9


def test_train_stream_never_ends_and_take_matches_next():
    text = numbered_lines(37)
    first = dataset.TrainBatches(text, batch_size=4, sequence_length=4, seed=7)
    second = dataset.TrainBatches(text, batch_size=4, sequence_length=4, seed=7)
    assert first.num_batches_per_epoch == 9
    many = [next(first) for _ in range(9 * 12 + 5)]  # far more batches than one epoch holds
    inputs, targets = second.take(len(many))
    assert inputs.shape == targets.shape == (len(many), 4, 4)
    np.testing.assert_array_equal(inputs, np.stack([b[0] for b in many]))
    np.testing.assert_array_equal(targets, np.stack([b[1] for b in many]))
    # The streams stay in step after the take, across epoch boundaries.
    np.testing.assert_array_equal(next(first)[0], next(second)[0])
    assert second.take(0)[0].shape == (0, 4, 4)


def test_train_stream_rows_are_a_share_of_the_same_stream():
    """A process's stream (`rows`) holds exactly those rows of every batch of the whole one."""
    text = numbered_lines(37)
    whole = dataset.TrainBatches(text, batch_size=4, sequence_length=4, seed=3)
    rows = np.array([2, 3])
    share = dataset.TrainBatches(text, batch_size=4, sequence_length=4, seed=3, rows=rows)
    expected = whole.take(20)
    inputs, targets = share.take(20)
    assert inputs.shape == (20, 2, 4)
    np.testing.assert_array_equal(inputs, expected[0][:, rows])
    np.testing.assert_array_equal(targets, expected[1][:, rows])
    share.skip(3), whole.skip(3)
    np.testing.assert_array_equal(next(share)[0], next(whole)[0][rows])
    with pytest.raises(InputError, match="below the batch size 4"):
        dataset.TrainBatches(text, batch_size=4, sequence_length=4, seed=3, rows=[0, 4])


def test_train_batches_need_one_whole_batch():
    with pytest.raises(InputError, match="does not fill one batch of 20") as info:
        dataset.TrainBatches(numbered_lines(19), batch_size=20, sequence_length=4, seed=0)
    assert "--batch_size" in str(info.value)
    with pytest.raises(InputError, match="--sequence_length"):
        dataset.TrainBatches(numbered_lines(19), batch_size=2, sequence_length=0, seed=0)


def test_train_batches_are_fast():
    text = "".join(chr(32 + (i * 7919) % 95) for i in range(300_000))
    batches = dataset.TrainBatches(text, batch_size=128, sequence_length=64, seed=0)
    next(batches)
    start = time.perf_counter()
    for _ in range(300):  # crosses epoch boundaries (36 batches per epoch)
        inputs, _ = next(batches)
    per_batch = (time.perf_counter() - start) / 300
    assert inputs.shape == (128, 64)
    assert per_batch < 1e-3


# ------------------------------------------------------------------------------- test_batches


def test_test_batches_cover_each_crop_once_in_order():
    batches = dataset.test_batches(numbered_lines(23), batch_size=5, sequence_length=4)
    assert [b[0].shape[0] for b in batches] == [5, 5, 5, 5, 3]
    ids = np.concatenate([crop_ids(inputs) for inputs, _ in batches])
    np.testing.assert_array_equal(ids, np.arange(23))
    for inputs, targets in batches:
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_test_batches_need_a_whole_crop():
    with pytest.raises(InputError, match="shorter than one crop"):
        dataset.test_batches("abcd", batch_size=5, sequence_length=4)


# ------------------------------------------------------------------------ check_enough_batches


def test_enough_batches_passes_at_the_minimum():
    dataset.check_enough_batches(
        numbered_lines(40), batch_size=10, sequence_length=4, path_or_name="x.txt"
    )


def test_too_short_corpus_message_says_how_many_batches():
    with pytest.raises(InputError) as info:
        dataset.check_enough_batches(
            numbered_lines(39), batch_size=10, sequence_length=4, path_or_name="tiny.txt"
        )
    message = str(info.value)
    assert "tiny.txt" in message
    assert "195 characters yield 3 whole batches" in message
    assert "at least 4 batches (200 characters)" in message
    assert "--batch_size" in message and "--sequence_length" in message


@pytest.mark.parametrize("batch_size, sequence_length", [(10, 0), (0, 4), (10, -3)])
def test_nonpositive_sizes_are_rejected(batch_size, sequence_length):
    with pytest.raises(InputError, match="must be at least 1"):
        dataset.check_enough_batches(
            numbered_lines(100),
            batch_size=batch_size,
            sequence_length=sequence_length,
            path_or_name="x.txt",
        )


# ------------------------------------------------------------------------ fixed_hessian_batch


def test_fixed_hessian_batch_is_a_seeded_sample_without_replacement():
    text = numbered_lines(50)
    inputs, targets = dataset.fixed_hessian_batch(text, num_sequences=20, sequence_length=4, seed=5)
    again, _ = dataset.fixed_hessian_batch(text, num_sequences=20, sequence_length=4, seed=5)
    other, _ = dataset.fixed_hessian_batch(text, num_sequences=20, sequence_length=4, seed=6)
    assert inputs.shape == targets.shape == (20, 4)
    np.testing.assert_array_equal(inputs, again)
    assert not np.array_equal(inputs, other)
    ids = crop_ids(inputs)
    assert len(set(ids.tolist())) == 20 and ids.max() < 50
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    everything, _ = dataset.fixed_hessian_batch(text, num_sequences=50, sequence_length=4, seed=0)
    np.testing.assert_array_equal(np.sort(crop_ids(everything)), np.arange(50))
    with pytest.raises(InputError, match="only 50 crops"):
        dataset.fixed_hessian_batch(text, num_sequences=51, sequence_length=4, seed=0)
