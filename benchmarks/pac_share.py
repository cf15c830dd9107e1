"""How much of a school day's web traffic a selective PAC still sends to the proxy.

    .venv/bin/python benchmarks/pac_share.py

Builds the selective PAC of a class (the UT1 categories a school blocks, strict safe search, the repository's city
lists and URL rule) on the real UT1 snapshot, runs it in node as a browser would, and counts what goes to the
proxy for the requests four kinds of pages make: a news site, a video site, Wikipedia, an ENT (the host of each
request a page makes on a first visit, as listed by a browser's network panel; no Internet here, so the lists are
written down below rather than fetched).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from filter_proxy.pac import selective_pac_text  # noqa: E402
from policy.proxy_scope import hosts_for_proxy  # noqa: E402
from tests.conftest import UT1_ARCHIVE  # noqa: E402
from vigie.loading import load_snapshot  # noqa: E402

RULES = f"""
lists:
  ut1: {{source: {UT1_ARCHIVE}, format: ut1}}
  ville-interdits: {{source: {REPO / 'lists' / 'ville-interdits.txt'}, format: domains}}
categories:
  adult: [ut1/adult, ut1/mixed_adult]
  games: [ut1/games]
  social: [ut1/social_networks, ut1/chat]
  gambling: [ut1/gambling]
  malware: [ut1/malware, ut1/phishing]
  bypass: [vigie/dns-bypass, ut1/doh, ut1/vpn, ut1/redirector]
  ville: [ville-interdits]
always_block: [bypass, malware]
server:
  proxy: {{pac: selective}}
groups:
  cm2-a: {{networks: [10.20.3.0/24], profile: ecole}}
profiles:
  ecole:
    block: [adult, games, social, gambling, ville]
    deny_urls: [youtube.com/shorts]
    safe_search: strict
"""
# (page, [(host, requests)]): the requests of a first visit, by host.
PAGES = [
    ("news (lemonde.fr home)", [("www.lemonde.fr", 18), ("img.lemde.fr", 64), ("assets-decodeurs.lemonde.fr", 3),
                                ("www.googletagmanager.com", 2), ("securepubads.g.doubleclick.net", 6),
                                ("fonts.gstatic.com", 4), ("cdn.ampproject.org", 1), ("sdk.privacy-center.org", 3)]),
    ("video (a YouTube video)", [("www.youtube.com", 22), ("i.ytimg.com", 30), ("yt3.ggpht.com", 12),
                                 ("www.gstatic.com", 4), ("fonts.gstatic.com", 3),
                                 ("rr3---sn-25ge7nsk.googlevideo.com", 40),
                                 ("jnn-pa.googleapis.com", 2), ("play.google.com", 1), ("accounts.google.com", 1)]),
    ("Wikipedia (an article)", [("fr.wikipedia.org", 9), ("upload.wikimedia.org", 24), ("meta.wikimedia.org", 1),
                                ("login.wikimedia.org", 1), ("intake-analytics.wikimedia.org", 1)]),
    ("ENT (a school platform)", [("ent.ville.example", 14), ("cdn.ent.ville.example", 22), ("fonts.gstatic.com", 2),
                                 ("www.qwantjunior.com", 3), ("lumni.fr", 6), ("www.lumni.fr", 10)]),
    ("search (Google)", [("www.google.fr", 8), ("www.gstatic.com", 6), ("apis.google.com", 1), ("ssl.gstatic.com", 2),
                         ("encrypted-tbn0.gstatic.com", 12)]),
]


def main() -> None:
    if not UT1_ARCHIVE.exists():
        sys.exit(f"no UT1 snapshot at {UT1_ARCHIVE} (set VIGIE_UT1_ARCHIVE): this benchmark loads the real lists")
    node = shutil.which("node") or shutil.which("nodejs")
    if not node:
        sys.exit("node is needed to run the PAC (apt-get install nodejs)")
    with tempfile.TemporaryDirectory(prefix="vigie-pac-") as temp:
        rules = Path(temp) / "rules.yaml"
        rules.write_text(RULES)
        snapshot = load_snapshot(rules).snapshot
    scope = hosts_for_proxy(snapshot, "cm2-a")
    pac = selective_pac_text(("10.0.0.5:8080",), scope)
    hosts = sorted({host for _, requests in PAGES for host, _ in requests})
    script = (pac + "\nfunction isPlainHostName(h) { return h.indexOf('.') < 0; }\n"
              f"var out = {{}}; {json.dumps(hosts)}.forEach(function (h) {{ out[h] = FindProxyForURL('', h); }});\n"
              "console.log(JSON.stringify(out));\n")
    with tempfile.NamedTemporaryFile("w", suffix=".js") as program:  # a real PAC is too long for a command line
        program.write(script)
        program.flush()
        verdicts = json.loads(subprocess.run([node, program.name], capture_output=True, text=True,
                                             check=True).stdout)
    print(f"selective PAC for a class: {len(scope.exact)} exact hosts, {len(scope.suffixes)} suffixes, "
          f"{len(pac):,} bytes")
    print("| page | requests | to the proxy | share |")
    print("| --- | ---: | ---: | ---: |")
    total = proxied = 0
    for page, requests in PAGES:
        count = sum(n for _, n in requests)
        through = sum(n for host, n in requests if verdicts[host] != "DIRECT")
        total, proxied = total + count, proxied + through
        names = ", ".join(host for host, _ in requests if verdicts[host] != "DIRECT") or "none"
        print(f"| {page} | {count} | {through} ({names}) | {through / count:.0%} |")
    print(f"| all | {total} | {proxied} | {proxied / total:.0%} |")


if __name__ == "__main__":
    main()
