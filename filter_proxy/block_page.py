"""The page a child (and the teacher beside them) sees instead of a blocked site: what, why, until when, and a
reference for the IT department. French by default, English when the browser prefers it; one self-contained HTML
document (no external resource: the tablet may reach nothing else)."""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from datetime import datetime, timedelta

from policy.decision import Decision, Reason

LANGUAGES = ("fr", "en")

_WHY = {
    "fr": {
        Reason.DENY_LIST: "Ce site est sur la liste des sites interdits.",
        Reason.KIOSK: "Cet appareil ne peut ouvrir que quelques sites choisis.",
        Reason.BLOCK_ALL: "Internet est fermé à cette heure-ci.",
        Reason.SCREEN_TIME: "Le temps d'écran de la journée est écoulé.",
        Reason.BYPASS: "Ce service permettrait de contourner le filtre.",
        Reason.CATEGORY: "Ce site fait partie d'une catégorie bloquée.",
        Reason.URL_LIST: "Cette page fait partie d'une catégorie bloquée.",
        Reason.IP_LITERAL: "Les adresses IP ne sont pas autorisées, seulement les noms de sites.",
        Reason.DESTINATION: "Cette adresse n'est pas accessible depuis les tablettes.",
        Reason.ENGINE_ERROR: "Le filtre n'a pas pu vérifier ce site : il reste bloqué par prudence.",
        Reason.OVERRIDE_BLOCK: "Ton enseignant ou ton enseignante a bloqué ce site pour le moment.",
        Reason.OVERRIDE_LOCK: "Ton enseignant ou ton enseignante a verrouillé les tablettes pour le moment.",
        Reason.UNKNOWN_CLIENT: "Cet appareil n'est pas reconnu par le filtre.",
    },
    "en": {
        Reason.DENY_LIST: "This site is on the list of forbidden sites.",
        Reason.KIOSK: "This device can only open a few chosen sites.",
        Reason.BLOCK_ALL: "The Internet is closed at this time.",
        Reason.SCREEN_TIME: "Today's screen time is used up.",
        Reason.BYPASS: "This service would get around the filter.",
        Reason.CATEGORY: "This site belongs to a blocked category.",
        Reason.URL_LIST: "This page belongs to a blocked category.",
        Reason.IP_LITERAL: "IP addresses are not allowed, only site names.",
        Reason.DESTINATION: "This address cannot be reached from the tablets.",
        Reason.ENGINE_ERROR: "The filter could not check this site, so it stays blocked to be safe.",
        Reason.OVERRIDE_BLOCK: "Your teacher has blocked this site for now.",
        Reason.OVERRIDE_LOCK: "Your teacher has locked the tablets for now.",
        Reason.UNKNOWN_CLIENT: "This device is not known to the filter.",
    },
}

_TEXT = {
    "fr": {
        "title": "Site bloqué", "blocked": "Ce site est bloqué", "category": "Catégorie",
        "back_at": "Accessible de nouveau {when}.", "today": "aujourd'hui à {time}", "tomorrow": "demain à {time}",
        "on": "le {date} à {time}", "adults": "Pour les adultes", "reference": "Référence à donner au service "
        "informatique", "profile": "Profil", "group": "Groupe", "rule": "Règle", "time": "Heure",
        "fronting": "Le nom demandé ne correspond pas à la connexion ouverte.",
    },
    "en": {
        "title": "Site blocked", "blocked": "This site is blocked", "category": "Category",
        "back_at": "Available again {when}.", "today": "today at {time}", "tomorrow": "tomorrow at {time}",
        "on": "on {date} at {time}", "adults": "For adults", "reference": "Reference for the IT department",
        "profile": "Profile", "group": "Group", "rule": "Rule", "time": "Time",
        "fronting": "The name asked for does not match the connection opened.",
    },
}


@dataclass(frozen=True)
class CategoryText:
    """A blocked category as the page names it: the rules' name and the list's own title and description."""

    name: str
    titles: dict[str, str]
    descriptions: dict[str, str]


@dataclass(frozen=True)
class BlockPageFacts:
    site: str
    decision: Decision
    categories: tuple[CategoryText, ...]
    at: datetime  # local time of the request
    message: str | None = None  # the profile's own words
    rules_generation: int = 0
    opens_at: datetime | None = None  # when this client may open the site again (None: not in the next 14 days)


def preferred_language(accept_language: str | None) -> str:
    """French unless the browser ranks English above French (`Accept-Language: en-GB,en;q=0.9,fr;q=0.5`)."""
    best, best_quality = "fr", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        language = tag.strip().lower()[:2]
        if language not in LANGUAGES:
            continue
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if quality > best_quality:
            best, best_quality = language, quality
    return best


def reference(facts: BlockPageFacts) -> str:
    """Short code of (site, group, minute, rules generation): the IT department matches it with `vigie explain`."""
    text = f"{facts.site}|{facts.decision.group}|{facts.at:%Y%m%d%H%M}|{facts.rules_generation}"
    code = hashlib.sha256(text.encode()).hexdigest()[:8].upper()
    return f"{code[:4]}-{code[4:]}"


def _when(until: datetime, at: datetime, text: dict[str, str]) -> str:
    local_until = until.astimezone(at.tzinfo)
    time_text = f"{local_until:%H:%M}"
    if local_until.date() == at.date():
        return text["today"].format(time=time_text)
    if local_until.date() == at.date() + timedelta(days=1):
        return text["tomorrow"].format(time=time_text)
    return text["on"].format(date=f"{local_until:%d/%m/%Y}", time=time_text)


def render(facts: BlockPageFacts, language: str) -> bytes:
    text, why = _TEXT[language], _WHY[language]
    decision = facts.decision
    def e(value: str) -> str:  # every value lands in text, never in an attribute: quotes may stay
        return html.escape(value, quote=False)

    colon = " :" if language == "fr" else ":"
    reason = why.get(decision.reason, why[Reason.CATEGORY])
    if decision.reason is Reason.BYPASS and decision.rule == "domain-fronting":
        reason = text["fronting"]
    parts = [f'<p class="why">{e(reason)}</p>']
    for category in facts.categories:
        title = category.titles.get(language) or category.titles.get("fr") or category.name
        description = category.descriptions.get(language) or category.descriptions.get("fr") or ""
        parts.append(f'<p class="category"><b>{e(text["category"])}{colon}</b> {e(title)}'
                     + (f" — {e(description)}" if description and description != title else "") + "</p>")
    if facts.message:
        parts.append(f'<p class="message">{e(facts.message)}</p>')
    if facts.opens_at is not None:
        parts.append(f'<p class="until">{e(text["back_at"].format(when=_when(facts.opens_at, facts.at, text)))}</p>')
    details = [(text["group"], decision.group), (text["profile"], decision.profile), (text["rule"], decision.rule),
               (text["time"], f"{facts.at:%d/%m/%Y %H:%M}")]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in details if v)
    page = f"""<!DOCTYPE html>
<html lang="{language}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(text["title"])} — {e(facts.site)}</title>
<style>
body{{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#eef3f8;color:#1d2733}}
main{{max-width:40rem;margin:6vh auto;padding:2rem 2.2rem;background:#fff;border-radius:1rem;
box-shadow:0 .3rem 1.2rem rgba(0,0,0,.08)}}
.icon{{display:block}} h1{{font-size:1.9rem;margin:.6rem 0 .2rem}}
.site{{font-size:1.25rem;font-weight:600;color:#0b5cad;word-break:break-all;margin:0 0 1.2rem}}
.why{{font-size:1.3rem}} .until{{font-size:1.2rem;font-weight:600;color:#1f7a3a}}
.message{{font-style:italic}} details{{margin-top:1.6rem;color:#4a5868}} th{{text-align:left;padding-right:1rem}}
.adults{{margin-top:1.6rem;color:#4a5868}}
.ref{{font-family:ui-monospace,monospace;font-size:1.2rem;letter-spacing:.1em}}
</style></head>
<body><main>
<svg class="icon" aria-hidden="true" viewBox="0 0 64 64" width="64" height="64"><circle cx="32" cy="32" r="28"
 fill="#e8623a"/><rect x="14" y="27" width="36" height="10" rx="3" fill="#fff"/></svg>
<h1>{e(text["blocked"])}</h1>
<p class="site">{e(facts.site)}</p>
{"".join(parts)}
<p class="adults">{e(text["reference"])}{colon} <span class="ref">{e(reference(facts))}</span></p>
<details><summary>{e(text["adults"])}</summary><table>{rows}</table></details>
</main></body></html>
"""
    return page.encode("utf-8")
