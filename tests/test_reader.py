"""capray.reader: the one image reader of prepare and caption — failures kept in place, chunks streamed."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from capray import reader, storage
from capray.images import ImageDecodeError
from capray.shards import Sample


def _jpeg(color: str, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size // 2), color).save(buffer, "JPEG")
    return buffer.getvalue()


def test_each_entry_is_its_input_decoded_or_why_not_and_only_a_read_that_may_succeed_later_is_transient():
    contents = [_jpeg("red"), b"not an image", storage.StorageError("s3://b/gone.jpg: not found"),
                storage.TransientStorageError("s3://b/busy.jpg: SlowDown"), _jpeg("blue")]
    decoded = reader.decode_all(contents, count=len(contents), image_size=16)
    assert len(decoded) == 5 and decoded.pixels.shape == (5, 16, 16, 3)
    assert decoded.ok.tolist() == [True, False, False, False, True]
    assert decoded.transient.tolist() == [False, False, False, True, False]
    assert decoded.errors[2] == "s3://b/gone.jpg: not found" and "SlowDown" in decoded.errors[3]
    assert decoded.pixels[0, 8, 8, 0] > 200 > decoded.pixels[4, 8, 8, 0]  # red, then blue, in input order
    assert not decoded.pixels[1:4].any() and decoded.widths.tolist() == [40, 0, 0, 0, 40]
    assert decoded.heights.tolist() == [20, 0, 0, 0, 20]


def test_chunks_hold_at_most_rows_items_and_a_samples_own_error_is_its_entrys():
    taken = []

    def samples():
        for i in range(7):
            taken.append(i)
            yield Sample(path=f"s.tar#{i}", key=str(i), image=_jpeg("green"),
                         error="missing image member" if i == 3 else None)

    chunks = []
    for chunk, decoded in reader.decode_chunks(samples(), content=reader.sample_content, rows=3, image_size=8):
        assert len(taken) == 3 * len(chunks) + len(chunk)  # streamed: nothing is read ahead of the chunk
        chunks.append(([s.key for s in chunk], decoded.errors))
    assert [keys for keys, _ in chunks] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert chunks[1][1] == ["missing image member", "", ""]
    assert isinstance(reader.sample_content(Sample(path="p", key="k", image=None, error="x")), ImageDecodeError)


def test_loose_objects_are_read_in_order_and_a_missing_one_is_an_error(tmp_path):
    for name, color in (("a.jpg", "red"), ("c.jpg", "blue")):
        (tmp_path / name).write_bytes(_jpeg(color))
    decoded = reader.read_objects([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "c.jpg")],
                                  image_size=8)
    assert decoded.ok.tolist() == [True, False, True] and not decoded.transient.any()
    assert np.argmax(decoded.pixels[0, 4, 4]) == 0 and np.argmax(decoded.pixels[2, 4, 4]) == 2
