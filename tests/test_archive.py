"""Safe extraction: every format unpacks byte-exact; hostile archives are refused with nothing written
outside and no dest left behind; bombs are stopped; `expect:` names what is missing."""
from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from hpcstage import archive
from hpcstage.archive import ArchiveError, Limits, check_expect, extract_into
from hpcstage.datadir import building

FILES = {
    "websight/prompts.jsonl": b"".join(json.dumps({"prompt": f"page {i}"}).encode() + b"\n" for i in range(4)),
    **{f"websight/images/{i}.png": bytes([i]) * (3000 + i) for i in range(4)},
}


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode, kind", [("w", "tar"), ("w:gz", "tar.gz"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
def test_every_tar_format_unpacks_byte_exact_with_hashes(tmp_path, mode, kind):
    a = make_tar(tmp_path / "a.archive", [reg(n, d) for n, d in FILES.items()], mode)
    assert archive.detect(a) == kind
    out = tmp_path / "out"
    out.mkdir()
    got = extract_into(a, out)
    assert tree(out) == FILES
    assert {f.path: f.sha256 for f in got.files} == {n: sha(d) for n, d in FILES.items()}
    assert got.bytes == sum(map(len, FILES.values()))


def test_zstd_tar_when_zstandard_is_installed(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    plain = make_tar(tmp_path / "a.tar", [reg(n, d) for n, d in FILES.items()], "w")
    (tmp_path / "a.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    extract_into(tmp_path / "a.tar.zst", out)
    assert tree(out) == FILES


def test_zip_unpacks_byte_exact_and_strip_components(tmp_path):
    a = tmp_path / "a.zip"
    with zipfile.ZipFile(a, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in FILES.items():
            zf.writestr(n, d)
    out = tmp_path / "out"
    out.mkdir()
    got = extract_into(a, out, strip_components=1)
    assert tree(out) == {n.removeprefix("websight/"): d for n, d in FILES.items()}
    assert got.kind == "zip" and len(got.files) == len(FILES)


def test_setuid_setgid_and_group_write_bits_are_stripped_not_refused(tmp_path):
    a = make_tar(tmp_path / "a.tar.gz", [reg("bin/tool", b"#!/bin/sh\n", 0o6777), reg("data.txt", b"x", 0o4666)])
    out = tmp_path / "out"
    out.mkdir()
    extract_into(a, out)
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "data.txt").stat().st_mode) == 0o644


def test_links_inside_the_tree_are_kept(tmp_path):
    a = make_tar(tmp_path / "a.tar", [reg("d/real.txt", b"hello"), special("d/alias.txt", tarfile.SYMTYPE, "real.txt"),
                                      special("hard.txt", tarfile.LNKTYPE, "d/real.txt")], "w")
    out = tmp_path / "out"
    out.mkdir()
    extract_into(a, out)
    assert (out / "d/alias.txt").is_symlink() and (out / "d/alias.txt").read_bytes() == b"hello"
    assert (out / "hard.txt").read_bytes() == b"hello"


def test_a_colon_after_a_digit_is_a_plain_name_not_a_drive(tmp_path):
    a = _zip(tmp_path / "a.zip", [("1:a", b"one", None)])
    out = tmp_path / "out"
    out.mkdir()
    extract_into(a, out)
    assert tree(out) == {"1:a": b"one"}
    assert [archive.clean_name(n, "a.zip") for n in ("", ".", "./", "a", "./a//b/")] == [None, None, None, "a", "a/b"]
    assert archive.clean_name("dir\\name", "a.tar") == "dir\\name"  # in a tar a backslash is part of a name


def test_a_later_copy_of_a_name_wins_as_tar_does(tmp_path):
    a = make_tar(tmp_path / "a.tar", [reg("d/f", b"first"), reg("d/f", b"second"), reg("g", b"x"),
                                      special("d/h", tarfile.LNKTYPE, "g"), special("d/h", tarfile.LNKTYPE, "d/f"),
                                      special("n/e/w/h", tarfile.LNKTYPE, "g")], "w")
    out = tmp_path / "out"
    out.mkdir()
    extract_into(a, out)
    assert tree(out) == {"d/f": b"second", "d/h": b"second", "g": b"x", "n/e/w/h": b"x"}


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    """(name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


HOSTILE_TARS = {
    "dotdot": ([reg("ok.txt", b"ok"), reg("../escaped.txt", b"pwned")], "climbs out"),
    "absolute": ([reg("ok.txt", b"ok"), reg("/tmp/hpcstage-absolute-member.txt", b"pwned")], "absolute path"),
    "symlink to /etc then write through it": (
        [special("etc", tarfile.SYMTYPE, "/etc"), reg("etc/hpcstage-pwned", b"pwned")], "absolute path '/etc'"),
    "symlink climbing out": ([special("up", tarfile.SYMTYPE, "../../.."), reg("up/x", b"pwned")], "points outside"),
    "file over an earlier symlink": ([reg("sub/a", b"a"), special("link", tarfile.SYMTYPE, "sub"), reg("link", b"b")],
                                     "goes through the symlink"),
    "file under a file": ([reg("a", b"a"), reg("a/b", b"b")], "goes through the file member"),
    "symlink over a file": ([reg("x", b"x"), special("x", tarfile.SYMTYPE, "y")], "both a symlink"),
    "symlink over a folder": ([special("d", tarfile.DIRTYPE), special("d", tarfile.SYMTYPE, "y")], "both a symlink"),
    "symlink to nothing": ([special("x", tarfile.SYMTYPE, "")], "empty or invalid target"),
    "symlink to the parent": ([special("d/up", tarfile.SYMTYPE, "../.."), reg("ok.txt", b"ok")], "points outside"),
    "write through an inside symlink": (
        [reg("sub/a", b"a"), special("link", tarfile.SYMTYPE, "sub"), reg("link/b", b"b")], "goes through the symlink"),
    "symlink chain out": ([special("d", tarfile.SYMTYPE, "."), special("e", tarfile.SYMTYPE, "d/..")], "through other links"),
    "hardlink outside": ([special("passwd", tarfile.LNKTYPE, "/etc/passwd")], "absolute path"),
    "hardlink to a name not in the archive": ([special("x", tarfile.LNKTYPE, "not/there")], "not a file of this archive"),
    "fifo": ([reg("ok.txt", b"ok"), special("pipe", tarfile.FIFOTYPE)], "FIFO"),
    "device": ([special("null", tarfile.CHRTYPE)], "character device"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TARS))
def test_hostile_tar_is_refused_with_nothing_written_outside_and_no_dest(tmp_path, case):
    members, words = HOSTILE_TARS[case]
    a = make_tar(tmp_path / "hostile.tar.gz", members)
    data = tmp_path / "data"
    dest = data / "dest"
    with pytest.raises(ArchiveError) as err:
        with building(data, dest) as tmp:
            extract_into(a, tmp.proc_path)
    assert words in str(err.value) and "refused" in str(err.value), err.value
    assert len(str(err.value).splitlines()) == 1
    assert not dest.exists() and list(data.iterdir()) == []  # no dest, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hostile.tar.gz"]
    assert not Path("/etc/hpcstage-pwned").exists() and not Path("/tmp/hpcstage-absolute-member.txt").exists()


HOSTILE_ZIPS = {
    "dotdot": ([("ok.txt", b"ok", None), ("../escaped.txt", b"pwned", None)], "climbs out"),
    "deep dotdot": ([("a/../../escaped.txt", b"pwned", None)], "climbs out"),
    "absolute": ([("/tmp/hpcstage-absolute-zip.txt", b"pwned", None)], "absolute path"),
    "windows path": ([("..\\..\\escaped.txt", b"pwned", None)], "Windows path"),
    "drive letter": ([("C:/hpcstage-drive-1", b"pwned", None)], "absolute path"),
    "bare drive": ([("d:", b"pwned", None)], "absolute path"),
    "backslash root": ([("\\hpcstage-root.txt", b"pwned", None)], "absolute path"),
    "symlink out": ([("etc", b"/etc", stat.S_IFLNK | 0o777), ("etc/hpcstage-pwned", b"x", None)], "absolute path '/etc'"),
    "fifo": ([("pipe", b"", stat.S_IFIFO | 0o644)], "FIFO"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ZIPS))
def test_hostile_zip_is_refused_with_nothing_written(tmp_path, case):
    entries, words = HOSTILE_ZIPS[case]
    a = _zip(tmp_path / "hostile.zip", entries)
    dest = tmp_path / "data" / "dest"
    with pytest.raises(ArchiveError, match=words):
        with building(tmp_path / "data", dest) as tmp:
            extract_into(a, tmp.proc_path)
    assert list((tmp_path / "data").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hostile.zip"]


class Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


BOMB = 300 << 20  # 300 MB of zeros: ~300 kB packed


def test_tar_bomb_is_stopped_by_the_ratio_limit(tmp_path):
    a = tmp_path / "bomb.tar.gz"
    with tarfile.open(a, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = BOMB
        tf.addfile(info, Zeros(BOMB))
    assert a.stat().st_size < 2 << 20
    dest = tmp_path / "data" / "dest"
    with pytest.raises(ArchiveError, match="archive bomb"):
        with building(tmp_path / "data", dest) as tmp:
            extract_into(a, tmp.proc_path)
    assert list((tmp_path / "data").iterdir()) == []
    # the limit is a manifest key: raised, the same archive unpacks
    out = tmp_path / "out"
    out.mkdir()
    extract_into(a, out, limits=Limits(max_ratio=1e6))
    assert (out / "zeros.bin").stat().st_size == BOMB


def test_zip_bomb_is_refused_from_its_directory_before_any_write(tmp_path):
    a = tmp_path / "bomb.zip"
    with zipfile.ZipFile(a, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as f:
            z = Zeros(BOMB)
            while chunk := z.read(8 << 20):
                f.write(chunk)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="archive bomb"):
        extract_into(a, out)
    assert list(out.iterdir()) == []
    with pytest.raises(ArchiveError, match="max_unpacked_bytes"):
        extract_into(a, out, limits=Limits(max_bytes=1 << 20, max_ratio=1e6))
    assert list(out.iterdir()) == []


def test_too_many_members_is_refused(tmp_path):
    a = make_tar(tmp_path / "many.tar", [reg(f"f{i}", b"x") for i in range(20)], "w")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="more than 10 members"):
        extract_into(a, out, limits=Limits(max_members=10))


def test_damaged_archive_is_one_clear_error(tmp_path):
    good = make_tar(tmp_path / "a.tar.gz", [reg(n, d) for n, d in FILES.items()])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match="damaged|truncated"):
        extract_into(cut, out)
    (tmp_path / "x.bin").write_bytes(b"not an archive at all" * 40)
    with pytest.raises(ArchiveError, match="not a tar"):
        extract_into(tmp_path / "x.bin", out)


def test_expect_names_what_is_missing(tmp_path):
    root = tmp_path / "d"
    for n, d in FILES.items():
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(d)
    ok = {"files": ["websight/prompts.jsonl"], "dirs": ["websight/images"],
          "jsonl": {"websight/prompts.jsonl": 4}, "count": {"websight/images/*.png": 4, "*.png": 4}}
    assert check_expect(root, ok) == []
    (root / "websight/images/3.png").unlink()
    (root / "websight/prompts.jsonl").write_text('{"a": 1}\nnot json\n')
    problems = check_expect(root, {**ok, "files": ["websight/missing.txt"], "dirs": ["nope"]})
    assert problems == [
        "file websight/missing.txt is missing", "folder nope is missing",
        "jsonl websight/prompts.jsonl: line 2 is not valid JSON",
        "websight/images/*.png matches 3 files, expected 4", "*.png matches 3 files, expected 4",
    ]
    assert check_expect(tmp_path / "absent", ok) == [f"{tmp_path / 'absent'} does not exist"]


def test_each_limit_allows_exactly_its_value_and_refuses_one_more(tmp_path):
    a = make_tar(tmp_path / "a.tar", [reg("a", b"x" * 60), reg("d/b", b"y" * 40)], "w")
    assert a.stat().st_size == 10240  # one tar record: 100 bytes unpack from 10240 packed, exactly 5/512 of it
    fits = [Limits(max_bytes=100), Limits(max_members=2), Limits(ratio_floor=100, max_ratio=0.001),
            Limits(ratio_floor=0, max_ratio=5 / 512)]
    for i, limits in enumerate(fits):
        out = tmp_path / f"fits{i}"
        out.mkdir()
        assert extract_into(a, out, limits=limits).bytes == 100
        assert tree(out) == {"a": b"x" * 60, "d/b": b"y" * 40}
    over = [(Limits(max_bytes=99), "max_unpacked_bytes"), (Limits(max_members=1), "more than 1 members"),
            (Limits(ratio_floor=99, max_ratio=0.001), "archive bomb"), (Limits(ratio_floor=0, max_ratio=4 / 512), "archive bomb")]
    for i, (limits, words) in enumerate(over):
        out = tmp_path / f"over{i}"
        out.mkdir()
        with pytest.raises(ArchiveError, match=words):
            extract_into(a, out, limits=limits)
