"""List formats and the UT1 archive, read as cities have them."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blocklists.errors import ListError, NameRejected, VigieError
from blocklists.formats import MAX_BAD_LINES, parse_adblock, parse_domains, parse_hosts, parse_urls
from blocklists.names import ip_literal, normalize_domain, normalize_host, normalize_path
from blocklists.ut1 import read_ut1


def test_domains_normalise_case_dots_and_idn_and_keep_addresses_apart() -> None:
    parsed = parse_domains("city.txt", ["# comment", "", "WWW.Example.FR.", "école.fr", "203.0.113.9", "bad..name"])
    assert parsed.domains == ["www.example.fr", "xn--cole-9oa.fr"]
    assert parsed.addresses == ["203.0.113.9"]
    assert [str(p) for p in parsed.problems] == ["city.txt:6: 'bad..name' is not a domain name (example: "
                                                 "www.example.fr)"]


def test_hosts_and_adblock_formats() -> None:
    hosts = parse_hosts("hosts", ["0.0.0.0 ads.example.com tracker.example.com # x", "127.0.0.1 localhost",
                                  "nonsense"])
    assert hosts.domains == ["ads.example.com", "tracker.example.com"]
    assert [p.line for p in hosts.problems] == [3]
    adblock = parse_adblock("ab", ["! title", "||ads.example.com^", "@@||ok.example.com^", "##.banner",
                                   "||x.com/path", "||y.com^$third-party"])
    assert adblock.domains == ["ads.example.com"] and adblock.exceptions == ["ok.example.com"]
    assert adblock.skipped == 3


def test_url_lists_keep_host_and_path_prefix() -> None:
    parsed = parse_urls("urls", ["www.Example.com/Path/x", "http://example.org", "203.0.113.1/p", "a.fr/b//c/"])
    assert [(u.host, u.path_prefix) for u in parsed.urls] == [
        ("www.example.com", "/path/x"), ("example.org", "/"), ("203.0.113.1", "/p"), ("a.fr", "/b/c/")]


@pytest.mark.parametrize(("raw", "expected"), [
    ("/adult-section/1", "/adult-section/1"),
    ("/%61dult-section/1", "/adult-section/1"),            # an escaped letter
    ("/%2e/adult-section", "/adult-section"),               # an escaped dot segment
    ("//adult-section//1", "/adult-section/1"),             # doubled slashes
    ("/./adult-section", "/adult-section"),
    ("/x/../adult-section", "/adult-section"),
    ("/../../adult-section", "/adult-section"),             # above the root stays at the root
    ("\\adult-section\\1", "/adult-section/1"),           # backslashes, as IIS reads them
    ("/ADULT-Section", "/adult-section"),
    ("/a/b/..", "/a/"),
    ("/dir/", "/dir/"),
    ("/search?q=%41B", "/search?q=ab"),
    ("/page#frag", "/page"),
    ("/%252e", "/%2e"),                                     # decoded once, as a server does
    ("", "/"),
])
def test_url_paths_are_matched_as_a_server_reads_them(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@given(st.text(max_size=120))
@example("/%")
@example("/%zz/%c3")
def test_any_path_normalises_to_a_clean_path(raw: str) -> None:
    path = normalize_path(raw).split("?", 1)[0]
    assert path.startswith("/") and "//" not in path and path == path.lower()
    assert "/./" not in path + "/" and "/../" not in path + "/"


def test_too_many_bad_lines_refuse_the_list() -> None:
    with pytest.raises(ListError, match="more than 1000 bad lines"):
        parse_domains("junk.txt", ["!!"] * (MAX_BAD_LINES + 1))


def test_a_ut1_archive_reads_with_aliases_and_descriptions(ut1_archive: Path) -> None:
    collection = read_ut1(ut1_archive)
    assert collection.aliases["porn"] == "adult" and collection.resolve("porn") == "adult"
    assert collection.resolve("nonexistent") is None
    assert collection.info["adult"].descriptions["fr"].startswith("Des sites adultes")
    assert collection.info["adult"].titles == {"en": "Adult (X)", "fr": "Adulte (X)"}
    assert "tiktok.com" in collection.categories["social_networks"].domains
    assert collection.categories["malware"].addresses == ["198.51.100.66"]
    assert collection.categories["adult"].urls, "adult has URL lists even without its domains file"


def test_an_unpacked_ut1_tree_reads_as_the_archive_does(tmp_path: Path, ut1_archive: Path) -> None:
    with tarfile.open(ut1_archive) as archive:
        archive.extractall(tmp_path, filter="tar")
    unpacked, packed = read_ut1(tmp_path / "blacklists"), read_ut1(ut1_archive)
    assert unpacked.aliases == packed.aliases and unpacked.info.keys() == packed.info.keys()
    assert {n: (c.domains, c.urls) for n, c in unpacked.categories.items()} == \
        {n: (c.domains, c.urls) for n, c in packed.categories.items()}


def test_the_real_ut1_snapshot_reads_with_aliases_and_descriptions(real_ut1_archive: Path) -> None:
    collection = read_ut1(real_ut1_archive)
    assert len(collection.categories) > 60
    assert collection.aliases["porn"] == "adult" and collection.resolve("porn") == "adult"
    assert collection.info["adult"].descriptions["fr"].startswith("Des sites adultes")
    assert "tiktok.com" in collection.categories["social_networks"].domains
    assert collection.categories["adult"].urls, "adult has URL lists even without its domains file"


def _archive(tmp_path: Path, members: list[tarfile.TarInfo], data: bytes = b"example.com\n") -> Path:
    path = tmp_path / "hostile.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            if member.isfile():
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
            else:
                archive.addfile(member)
    return path


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("blacklists/../../etc/passwd"),
    tarfile.TarInfo("/etc/cron.d/evil"),
])
def test_an_archive_with_a_path_leaving_it_is_refused(tmp_path: Path, member: tarfile.TarInfo) -> None:
    with pytest.raises(ListError, match="leaves the archive"):
        read_ut1(_archive(tmp_path, [member]))


def test_an_archive_with_a_link_leaving_it_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("blacklists/adult")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
    with pytest.raises(ListError, match="leaves the archive"):
        read_ut1(_archive(tmp_path, [link]))


def test_a_truncated_archive_is_refused(tmp_path: Path, ut1_archive: Path) -> None:
    truncated = tmp_path / "truncated.tar.gz"
    whole = ut1_archive.read_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ListError, match="cannot read the UT1 archive"):
        read_ut1(truncated)


@given(st.text(max_size=80))
@example("xn--")
@example("a" * 64 + ".fr")
@example("é" * 70)
def test_any_name_normalises_or_raises_our_own_error(raw: str) -> None:
    try:
        name = normalize_domain(raw)
    except VigieError:
        return
    assert name == name.lower() and not name.endswith(".") and len(name) <= 253


@given(st.lists(st.text(max_size=40), max_size=20))
def test_every_parser_only_raises_our_own_errors(lines: list[str]) -> None:
    for parser in (parse_domains, parse_hosts, parse_adblock, parse_urls):
        with contextlib.suppress(VigieError):
            parser("fuzz", lines)


@pytest.mark.parametrize(("raw", "expected"), [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),  # one decimal number
    ("0x7f000001", "127.0.0.1"),  # hexadecimal
    ("0X7F.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),  # octal
    ("127.1", "127.0.0.1"),  # short forms: the last part fills the bytes left
    ("127.0.1", "127.0.0.1"),
    ("1.1.1.1.", "1.1.1.1"),  # a trailing dot
    ("16843009", "1.1.1.1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),  # IPv4-mapped IPv6 reaches the IPv4 host
    ("::ffff:7f00:1", "127.0.0.1"),
    ("[2001:DB8::1]", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),  # a zone
    ("1.2.3.256", None),
    ("08.0.0.1", None),  # 8 is no octal digit
    ("4294967296", None),  # over 32 bits
    ("1.2.3.4.5", None),
    ("1.+2.3.4", None),
    ("example.com", None),
    ("1e3", None),
])
def test_an_address_is_recognised_in_every_spelling_a_browser_accepts(raw: str, expected: str | None) -> None:
    assert ip_literal(raw) == expected


@pytest.mark.parametrize("raw", ["1.2.3.256", "example.0x1", "a.b.123", "08.0.0.1"])
def test_a_name_a_browser_reads_as_a_broken_address_is_no_host(raw: str) -> None:
    with pytest.raises(NameRejected):
        normalize_host(raw)


@given(st.text(max_size=40))
@example("0x")
@example("0.0x.0")
@example("[::ffff:1.2.3.4]")
def test_any_host_normalises_or_raises_our_own_error(raw: str) -> None:
    with contextlib.suppress(NameRejected):
        host = normalize_host(raw)
        assert host == normalize_host(host), "normalising twice changes nothing"


def test_every_safe_search_host_is_a_canonical_name() -> None:
    from blocklists.bundled_data import safe_search_hosts
    from blocklists.names import normalize_domain

    hosts = safe_search_hosts()
    assert all(normalize_domain(host) == host for host in hosts), [h for h in hosts if normalize_domain(h) != h]
    assert {"www.google.no", "www.google.fr", "www.google.com"} <= set(hosts), "every country, Norway included"
    assert not any("False" in host or "True" in host for host in hosts)
