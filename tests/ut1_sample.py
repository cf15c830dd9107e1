"""A small archive in the official UT1 layout, built by the tests themselves so that a fresh clone needs nothing
beside it: `blacklists/<category>/{domains,urls,expressions,usage}`, `blacklists/global_usage`, aliases as
symbolic links (`porn -> adult`), a category with URLs but no domains file (as UT1's `adult` is), and every
category the repository's rules.yaml names.

The real snapshot (`VIGIE_UT1_ARCHIVE`, by default `../shared/data/ut1-blacklists.tar.gz`) is used only by the
tests that need its size or content, and by the benchmarks; they skip with a one-line reason when it is absent.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

# category → (domains, urls); the entries are the names the tests ask about.
CATEGORIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "adult": ((), ("pages.example/adult-section", "example.net/xxx")),  # UT1's adult: URLs, no domains file
    "mixed_adult": (("mixed-adult.example",), ()),
    "lingerie": (("lingerie.example",), ()),
    "dating": (("dating.example",), ()),
    "agressif": (("agressif.example",), ()),
    "dangerous_material": (("dangerous.example",), ()),
    "drogue": (("drogue.example",), ()),
    "sect": (("sect.example",), ()),
    "gambling": (("pokerstars.fr", "casino.example"), ()),
    "arjel": (("arjel.example",), ()),
    "social_networks": (("tiktok.com", "instagram.com", "snapchat.com"), ("www.youtube.com/shorts",)),
    "chat": (("chat.example",), ()),
    "games": (("roblox.com", "fortnite.com", "jeux.example"), ()),
    "malware": (("malware.example", "198.51.100.66"), ()),
    "phishing": (("phishing.example",), ()),
    "cryptojacking": (("coinhive.example",), ()),
    "stalkerware": (("stalker.example",), ()),
    "doh": (("dns.example-doh.net",), ()),
    "vpn": (("hidemyname.example", "nordvpn.com"), ()),
    "redirector": (("redirect.example",), ()),
    "strict_redirector": (("translate.example",), ()),
    "update": (("update.example",), ()),
    "publicite": (("ads.example",), ()),
}
ALIASES = {"porn": "adult", "ads": "publicite", "aggressive": "agressif"}
GLOBAL_USAGE = """#
#\tNAME : name of tar blacklist
#\tNAME xx: Short name used display in listbox, menu choice etc for xx Language
#\tDESC xx: Description of the blacklist for xx Language
#
NAME:\tadult
DEFAULT_TYPE: black
SOURCE: https://squidguard.ut-capitole.fr
DESC EN: Some adult site from erotic to hard pornography.
DESC FR: Des sites adultes allant de l'érotique à la pornographie dure.
NAME EN: Adult (X)
NAME FR: Adulte (X)

NAME:\tsocial_networks
DEFAULT_TYPE: black
DESC EN: Social networks.
DESC FR: Réseaux sociaux.
NAME EN: Social networks
NAME FR: Réseaux sociaux

NAME:\tgames
DEFAULT_TYPE: black
DESC EN: Online games.
DESC FR: Jeux en ligne.
NAME EN: Games
NAME FR: Jeux
"""


def build_ut1_archive(path: Path) -> Path:
    """Write the sample archive at `path` (a `.tar.gz`) and return it."""
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "blacklists/", None)
        _add(archive, "blacklists/README", b"")
        _add(archive, "blacklists/global_usage", GLOBAL_USAGE.encode())
        for name, (domains, urls) in CATEGORIES.items():
            _add(archive, f"blacklists/{name}/", None)
            if domains:
                _add(archive, f"blacklists/{name}/domains", "".join(f"{d}\n" for d in domains).encode())
            if urls:
                _add(archive, f"blacklists/{name}/urls", "".join(f"{u}\n" for u in urls).encode())
            _add(archive, f"blacklists/{name}/expressions", b"")
            _add(archive, f"blacklists/{name}/usage", b"black\n")
        for alias, target in ALIASES.items():
            link = tarfile.TarInfo(f"blacklists/{alias}")
            link.type, link.linkname = tarfile.SYMTYPE, target
            archive.addfile(link)
    return path


def _add(archive: tarfile.TarFile, name: str, data: bytes | None) -> None:
    member = tarfile.TarInfo(name.rstrip("/"))
    if data is None:
        member.type, member.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(member)
        return
    member.size, member.mode = len(data), 0o644
    archive.addfile(member, io.BytesIO(data))
