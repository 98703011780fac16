"""Our tar member reader against tarfile on archives in every format the shards may come in."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile

import pytest

from contrastive.data.tar import iter_tar_members

MEMBERS = [
    ("000001.png", b"\x89PNG" + bytes(range(256)) * 3),
    ("000001.txt", "a photo of a seven".encode()),
    ("000001.json", b'{"label": "seven"}'),
    ("000002.txt", b""),  # empty member
    ("dir/sub/000003.flac", b"x" * 512),  # exactly one block: no padding
    ("d" * 90 + "/" + "e" * 60 + ".txt", b"ustar prefix, or a long name"),  # > 100 characters
    ("ünïcode/0004.txt", "non-ASCII name".encode()),
]


def write(path, fmt, *, mtime=0.0, directory=True, compress=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("000001.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "000001.png"
        tar.addfile(link)
    path.write_bytes(gzip.compress(buf.getvalue()) if compress else buf.getvalue())
    return path


def with_tarfile(path):
    with tarfile.open(path, mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize(
    "fmt,mtime", [(tarfile.GNU_FORMAT, 0), (tarfile.PAX_FORMAT, 0), (tarfile.PAX_FORMAT, 1.5e9 + 0.25)]
)  # float mtime: a pax header per member
def test_reads_what_tarfile_reads(tmp_path, fmt, mtime):
    path = write(tmp_path / "a.tar", fmt, mtime=mtime)
    assert list(iter_tar_members(str(path))) == with_tarfile(path) == MEMBERS


def test_ustar_prefix_names(tmp_path):
    members = [(n, d) for n, d in MEMBERS if n.isascii()]  # ustar has no room for other names
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "u.tar").write_bytes(buf.getvalue())
    assert list(iter_tar_members(str(tmp_path / "u.tar"))) == members


def test_gzip_compressed(tmp_path):
    path = write(tmp_path / "a.tar.gz", tarfile.PAX_FORMAT, compress=True)
    assert list(iter_tar_members(str(path))) == MEMBERS


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_archives(tmp_path):
    src = tmp_path / "src"
    for name, data in MEMBERS:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    names = [n for n, _ in MEMBERS]
    for fmt in ("gnu", "posix"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "dir", *names], check=True)
        assert list(iter_tar_members(str(out))) == with_tarfile(out)
        assert sorted(iter_tar_members(str(out))) == sorted(MEMBERS)


def test_bad_archives_raise_read_error(tmp_path):
    good = write(tmp_path / "a.tar", tarfile.PAX_FORMAT)
    with tarfile.open(good) as tar:
        png, txt = tar.getmember("000001.png"), tar.getmember("000001.txt")
    data = good.read_bytes()
    corrupt = bytearray(data)
    corrupt[txt.offset + 10] ^= 0xFF  # a byte of a later header's name: its checksum no longer matches
    cases = {
        "truncated in a member": data[: png.offset_data + 100],
        "truncated in a header": data[: txt.offset + 100],
        "bad header": bytes(corrupt),
        "empty": b"",
        "not a tar": b"<html>not found</html>" * 100,
    }
    for what, content in cases.items():
        path = tmp_path / "bad.tar"
        path.write_bytes(content)
        with pytest.raises(tarfile.ReadError):
            list(iter_tar_members(str(path)))
            pytest.fail(what)


def test_a_large_member_of_a_local_shard_is_a_span_read_when_asked(tmp_path):
    import pickle

    from contrastive.data.tar import Span

    big = bytes(range(256)) * 8192  # 2 MiB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("a.flac", big), ("a.txt", b"small"), ("b.flac", big[::-1] + b"odd")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "x.tar").write_bytes(buf.getvalue())
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    expected = [("a.flac", big), ("a.txt", b"small"), ("b.flac", big[::-1] + b"odd")]

    members = list(iter_tar_members(str(tmp_path / "x.tar"), lazy_over=1 << 20))
    assert [type(c) for _, c in members] == [Span, bytes, Span]
    assert [(n, bytes(c)) for n, c in members] == expected
    assert [len(c) for _, c in members] == [len(d) for _, d in expected]
    f = members[2][1].open()  # read as a file: seek and read where a decoder wants
    f.seek(-3, io.SEEK_END)
    assert f.read() == b"odd" and f.tell() == len(expected[2][1])
    f.seek(10)
    assert f.read(4) == expected[2][1][10:14]
    assert pickle.loads(pickle.dumps(members[0][1])) == big  # another process gets the bytes
    # without lazy_over, and in a compressed shard (no file offsets to point at), every member is read
    for path, lazy in (("x.tar", 0), ("x.tar.gz", 1 << 20)):
        assert list(iter_tar_members(str(tmp_path / path), lazy_over=lazy)) == expected

    # the file cut short after it was listed: reading the span is an error, not short bytes
    with open(tmp_path / "x.tar", "r+b") as out:
        out.truncate(len(buf.getvalue()) // 2)
    with pytest.raises(OSError, match="cut short"):
        bytes(members[2][1])
