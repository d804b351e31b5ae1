"""Hostile shards: a tar member's decompressed size is checked from its header before a byte is
read (a 2 GiB zero member in a 2 MB .tar.gz peaked at 5.3 GB RSS in extract), an image's pixel
count before it is decoded; each is a one-line reject naming the limit and its flag."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from samples import jpeg

from geopipe.pipeline.core.limits import MAX_MEMBER_BYTES
from geopipe.pipeline.ingest.shards import iter_tar_samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_LABEL = json.dumps({"latitude": 1.0, "longitude": 2.0}).encode()


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as they are read (the test itself never holds the member)."""

    def __init__(self, n: int):
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def _bomb(path, zero_bytes: int, mode: str = "w:gz") -> str:
    """A tar of 2 good samples, then ``bomb`` whose jpg is ``zero_bytes`` zeros, then a good one."""
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as tar:
        def add(name, data=None, size=None):
            info = tarfile.TarInfo(name)
            info.size = len(data) if size is None else size
            tar.addfile(info, io.BytesIO(data) if size is None else io.BufferedReader(_Zeros(size), 1 << 20))
        for key, i in (("a", 0), ("b", 1)):
            add(f"{key}.jpg", jpeg(i))
            add(f"{key}.json", _LABEL)
        add("bomb.jpg", size=zero_bytes)
        add("bomb.json", _LABEL)
        add("c.jpg", jpeg(2))
        add("c.json", _LABEL)
    return str(path)


def test_a_member_over_the_limit_is_skipped_unread_and_its_sample_named(tmp_path):
    url = _bomb(tmp_path / "b.tar", 3 << 20, mode="w")
    info = {}
    samples = list(iter_tar_samples(url, info, max_member=2 << 20))
    assert [s["__key__"] for s in samples] == ["a", "b", "bomb", "c"]
    bad = samples[2]
    assert bad["__error__"][0] == "member_too_large" and bad["jpg"] == b""
    assert "'bomb.jpg' is 3.0 MiB decompressed, over the 2 MiB limit (raise it with --max-member-mb)" in bad["__error__"][1]
    assert all("__error__" not in s for s in samples[:2] + samples[3:]) and samples[3]["jpg"] == jpeg(2)
    import hashlib

    assert info["sha256"] == hashlib.sha256(open(url, "rb").read()).hexdigest()  # skipped bytes are still hashed
    assert list(iter_tar_samples(url, max_member=3 << 20))[2]["jpg"] == bytes(3 << 20)  # at the limit: read


def test_a_member_cannot_smuggle_the_readers_own_fields(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.jpg", jpeg(0)), ("k.__error__", b"xx"), ("k.__url__", b"/etc/passwd"), ("k.json", _LABEL)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_tar_samples(str(path))
    assert set(sample) == {"__key__", "jpg", "json"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB")
def test_memory_stays_flat_whatever_a_member_declares(tmp_path):
    """A 384 MiB zero member (0.4 MB gzip) under the default 128 MiB limit: the reader's peak RSS
    grows by a few MiB, not by the member (before: the member was read whole)."""
    url = _bomb(tmp_path / "bomb.tar.gz", 3 * MAX_MEMBER_BYTES)
    code = ("import resource, sys; from geopipe.pipeline.ingest.shards import iter_tar_samples; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "n = [s.get('__error__', ('ok',))[0] for s in iter_tar_samples(sys.argv[1], {})]; "
            "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, check=True, timeout=300)
    reasons, grown_mb = out.stdout.rsplit(" ", 1)
    assert reasons == "['ok', 'ok', 'member_too_large', 'ok']"
    assert int(grown_mb) < 64, out.stdout


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")  # a few KB whatever its size
    return buf.getvalue()


def test_an_image_over_the_pixel_limit_is_a_reject_before_decoding():
    from geopipe.pipeline.ingest.decode import SampleError, decode_image

    with pytest.raises(SampleError, match=r"image is 10000 x 9000 = 90000000 pixels, over the 89478485 pixel limit "
                                          r"\(raise it with --max-image-pixels\)") as err:
        decode_image(_png(10000, 9000), lambda img: img)  # just over Pillow's warning threshold: decoded before
    assert err.value.reason == "image_too_large"
    with pytest.raises(SampleError, match="over the 1000 pixel limit") as err:
        decode_image(_png(40, 40), lambda img: img, max_pixels=1000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(SampleError, match="over the 1000 pixel limit"):  # far over Pillow's own bomb limit too
        decode_image(_png(20000, 20000), lambda img: img, max_pixels=1000)
    assert decode_image(_png(40, 40), lambda img: img.size, max_pixels=1600) == (40, 40)


def test_extract_rejects_both_in_one_line_and_the_flags_raise_the_limits(tmp_path):
    tar = _bomb(tmp_path / "b.tar", 3 << 20, mode="w")
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as fh:
        for name, data in (("p.png", _png(50, 50)), ("p.json", _LABEL)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            fh.addfile(info, io.BytesIO(data))

    def extract(store, *flags):
        cmd = [sys.executable, "-m", "geopipe", "extract", tar, str(big), "--store", str(tmp_path / store),
               "--workers", "0", "--batch-size", "4", *flags]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    out = extract("s.zarr", "--max-member-mb", "2", "--max-image-pixels", "2000")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 ok, 2 rejected (member_too_large: 1, image_too_large: 1)" in out.stderr, out.stderr
    rejects = pq.read_table(tmp_path / "s.zarr" / "rejects" / "rejects.parquet").to_pylist()
    assert {r["key"]: r["reason"] for r in rejects} == {"bomb": "member_too_large", "p": "image_too_large"}
    out = extract("t.zarr", "--max-member-mb", "4", "--max-image-pixels", "2500")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 ok, 1 rejected (corrupt_image: 1)" in out.stderr, out.stderr  # read now: 3 MiB of zeros are no image
    bad = extract("u.zarr", "--max-member-mb", "0")
    assert bad.returncode == 2 and "--max-member-mb" in bad.stderr
