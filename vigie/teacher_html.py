"""The teachers' page's HTML, in French and English: tornado templates (every value escaped), one self-contained
document per page (no script, no external resource), readable on a tablet in portrait and on a PC."""

from __future__ import annotations

from typing import Any

from tornado.template import DictLoader

TEXTS: dict[str, dict[str, str]] = {
    "fr": {
        "title": "Vigie — gestion de classe", "sign_in": "Se connecter", "account": "Identifiant",
        "password": "Mot de passe", "sign_out": "Se déconnecter", "wrong": "Identifiant ou mot de passe incorrect.",
        "too_many": "Trop d'essais : attendez une minute avant de réessayer.", "classes": "Vos classes",
        "class": "Classe", "profile": "En ce moment : profil « {profile} »", "until": "jusqu'à {time}",
        "no_end": "sans fin prévue", "overrides": "En cours", "no_override": "Aucune dérogation en cours.",
        "ends": "jusqu'à {time}", "by": "par {author}", "end": "Terminer", "usage": "Aujourd'hui",
        "tablets": "{active} tablette(s) utilisée(s) sur {devices}, {minutes} min d'écran en tout",
        "no_usage": "Temps d'écran indisponible (stockage injoignable).",
        "open": "Ouvrir un site pour la séance", "site": "Site (ex. : fr.wikipedia.org)", "minutes": "Minutes",
        "do_open": "Ouvrir", "lock": "Verrouiller la classe", "lock_help": "Seuls les sites autorisés du profil "
        "(l'ENT…) restent accessibles.", "do_lock": "Verrouiller", "only": "Seulement ce site",
        "only_help": "Tout est bloqué sauf ce site.", "do_only": "Seulement ce site",
        "kind_allow": "Site ouvert : {domain}", "kind_block": "Site bloqué : {domain}",
        "kind_lock": "Classe verrouillée", "done_open": "{site} est ouvert pour la classe.",
        "done_lock": "La classe est verrouillée.", "done_only": "Seul {site} est accessible.",
        "done_ended": "C'est terminé.", "refused_always_blocked": "Ce site fait partie des catégories toujours "
        "bloquées (contournement du filtre, logiciels malveillants) : seul le service informatique peut l'ouvrir.",
        "refused_not_a_site": "Ce n'est pas un nom de site (exemple : fr.wikipedia.org).",
        "refused_minutes": "Une durée de 1 à 480 minutes.", "refused_not_found": "Cette dérogation est déjà "
        "terminée.", "refused_other": "Refusé : {reason}", "store_down": "Le stockage d'état est injoignable : "
        "réessayez dans un instant.", "error": "Erreur {code}", "forbidden": "Cette page n'est pas pour vous.",
        "back": "Retour", "blocks": "Bloqué dans la dernière heure : {counts}", "nothing": "rien",
        "no_category": "hors catégorie",
    },
    "en": {
        "title": "Vigie — class management", "sign_in": "Sign in", "account": "Account", "password": "Password",
        "sign_out": "Sign out", "wrong": "Wrong account or password.",
        "too_many": "Too many attempts: wait a minute before trying again.", "classes": "Your classes",
        "class": "Class", "profile": "Now: profile “{profile}”", "until": "until {time}", "no_end": "no end planned",
        "overrides": "In force", "no_override": "No override in force.", "ends": "until {time}", "by": "by {author}",
        "end": "End", "usage": "Today", "tablets": "{active} of {devices} tablet(s) used, {minutes} min of screen time "
        "in all", "no_usage": "Screen time unavailable (state store unreachable).",
        "open": "Open a site for the lesson", "site": "Site (e.g. en.wikipedia.org)", "minutes": "Minutes",
        "do_open": "Open", "lock": "Lock the class", "lock_help": "Only the profile's allowed sites (the school "
        "platform…) stay reachable.", "do_lock": "Lock", "only": "Only this site",
        "only_help": "Everything is blocked but this site.", "do_only": "Only this site",
        "kind_allow": "Site open: {domain}", "kind_block": "Site blocked: {domain}", "kind_lock": "Class locked",
        "done_open": "{site} is open for the class.", "done_lock": "The class is locked.",
        "done_only": "Only {site} is reachable.", "done_ended": "Ended.",
        "refused_always_blocked": "This site is in a category that is always blocked (filter bypass, malware): only "
        "the IT department can open it.", "refused_not_a_site": "Not a site name (e.g. en.wikipedia.org).",
        "refused_minutes": "A duration from 1 to 480 minutes.", "refused_not_found": "That override has ended "
        "already.", "refused_other": "Refused: {reason}", "store_down": "The state store is unreachable: try again "
        "in a moment.", "error": "Error {code}", "forbidden": "This page is not for you.", "back": "Back",
        "blocks": "Blocked in the last hour: {counts}", "nothing": "nothing", "no_category": "no category",
    },
}

STYLE = """
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#eef3f8;color:#1d2733;
font-size:1.05rem}
header{background:#0b5cad;color:#fff;padding:.8rem 1.2rem;display:flex;justify-content:space-between;
align-items:center;gap:1rem;flex-wrap:wrap}
header h1{font-size:1.2rem;margin:0} header form{margin:0}
main{max-width:44rem;margin:1.2rem auto;padding:0 1rem}
section{background:#fff;border-radius:.8rem;padding:1rem 1.2rem;margin-bottom:1rem;box-shadow:0 .2rem .8rem
rgba(0,0,0,.06)}
h2{font-size:1.15rem;margin:0 0 .6rem} p{margin:.4rem 0}
label{display:block;margin:.5rem 0 .2rem;font-weight:600}
input[type=text],input[type=password],input[type=number]{width:100%;box-sizing:border-box;font-size:1.1rem;
padding:.6rem;border:1px solid #9aa9b8;border-radius:.4rem}
input[type=number]{width:7rem}
button{font-size:1.1rem;padding:.7rem 1.2rem;border-radius:.5rem;border:0;background:#0b5cad;color:#fff;
margin-top:.7rem;min-height:2.8rem;cursor:pointer}
button.quiet{background:#e3e9f0;color:#1d2733} button.danger{background:#b3261e}
.row{display:flex;gap:.8rem;align-items:end;flex-wrap:wrap} .row>div{flex:1 1 12rem}
.notice{padding:.7rem 1rem;border-radius:.5rem;background:#e4f3e8;color:#1f5130;margin-bottom:1rem}
.notice.bad{background:#fbe4e2;color:#7a1d16}
ul{padding-left:1.2rem} li{margin:.4rem 0}
.override{display:flex;justify-content:space-between;align-items:center;gap:.6rem;flex-wrap:wrap}
.override form{margin:0} .muted{color:#4a5868;font-size:.95rem}
a{color:#0b5cad}
"""

TEMPLATES = {
    "layout.html": """<!DOCTYPE html>
<html lang="{{ lang }}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ t["title"] }}</title><style>{% raw style %}</style></head>
<body><header><h1>{{ t["title"] }}</h1>
{% if teacher %}<form method="post" action="/deconnexion">{% raw xsrf %}<span>{{ teacher.name }}</span>
<button class="quiet" type="submit">{{ t["sign_out"] }}</button></form>{% end %}</header>
<main>{% block main %}{% end %}</main></body></html>""",
    "login.html": """{% extends "layout.html" %}{% block main %}
<section><h2>{{ t["sign_in"] }}</h2>
{% if message %}<p class="notice bad" role="alert">{{ t[message] }}</p>{% end %}
<form method="post" action="/connexion">{% raw xsrf %}
<label for="compte">{{ t["account"] }}</label>
<input type="text" id="compte" name="compte" autocomplete="username" autocapitalize="none" required>
<label for="mot_de_passe">{{ t["password"] }}</label>
<input type="password" id="mot_de_passe" name="mot_de_passe" autocomplete="current-password" required>
<button type="submit">{{ t["sign_in"] }}</button></form></section>{% end %}""",
    "home.html": """{% extends "layout.html" %}{% block main %}
<section><h2>{{ t["classes"] }}</h2><ul>
{% for group in groups %}<li><a href="/classe/{{ group }}">{{ t["class"] }} {{ group }}</a></li>{% end %}
</ul></section>{% end %}""",
    "error.html": """{% extends "layout.html" %}{% block main %}
<section><h2>{{ t["error"].format(code=code) }}</h2>
{% if code == 403 %}<p>{{ t["forbidden"] }}</p>{% end %}<p><a href="/">{{ t["back"] }}</a></p></section>
{% end %}""",
    "class.html": """{% extends "layout.html" %}{% block main %}
{% if notice %}<p class="notice{{ " bad" if notice_bad else "" }}" role="status">{{ notice }}</p>{% end %}
<section><h2>{{ t["class"] }} {{ group }}</h2><p>{{ status_line }}</p><p class="muted">{{ usage_line }}</p>
{% if blocks_line %}<p class="muted">{{ blocks_line }}</p>{% end %}</section>
<section><h2>{{ t["overrides"] }}</h2>
{% if not overrides %}<p class="muted">{{ t["no_override"] }}</p>{% end %}
{% for override_id, title, detail in overrides %}<div class="override"><div>
<strong>{{ title }}</strong> <span class="muted">{{ detail }}</span></div>
<form method="post">{% raw xsrf %}<input type="hidden" name="action" value="end">
<input type="hidden" name="override" value="{{ override_id }}">
<button class="quiet" type="submit">{{ t["end"] }}</button></form></div>{% end %}
</section>
<section><h2>{{ t["open"] }}</h2><form method="post">{% raw xsrf %}<input type="hidden" name="action" value="open">
<div class="row"><div><label for="site-open">{{ t["site"] }}</label>
<input type="text" id="site-open" name="site" autocapitalize="none" required></div>
<div><label for="minutes-open">{{ t["minutes"] }}</label>
<input type="number" id="minutes-open" name="minutes" min="1" max="480" value="{{ default_minutes }}"></div></div>
<button type="submit">{{ t["do_open"] }}</button></form></section>
<section><h2>{{ t["only"] }}</h2><p class="muted">{{ t["only_help"] }}</p>
<form method="post">{% raw xsrf %}<input type="hidden" name="action" value="only">
<div class="row"><div><label for="site-only">{{ t["site"] }}</label>
<input type="text" id="site-only" name="site" autocapitalize="none" required></div>
<div><label for="minutes-only">{{ t["minutes"] }}</label>
<input type="number" id="minutes-only" name="minutes" min="1" max="480" value="{{ default_minutes }}"></div></div>
<button type="submit">{{ t["do_only"] }}</button></form></section>
<section><h2>{{ t["lock"] }}</h2><p class="muted">{{ t["lock_help"] }}</p>
<form method="post">{% raw xsrf %}<input type="hidden" name="action" value="lock">
<label for="minutes-lock">{{ t["minutes"] }}</label>
<input type="number" id="minutes-lock" name="minutes" min="1" max="480" value="{{ default_minutes }}">
<br><button class="danger" type="submit">{{ t["do_lock"] }}</button></form></section>
{% end %}""",
}

_LOADER = DictLoader(TEMPLATES, autoescape="xhtml_escape")


def class_values(language: str, facts: dict[str, Any], outcome: tuple[str, str] | None) -> dict[str, Any]:
    """The class page's sentences, made from the facts the handler gathered."""
    t = TEXTS.get(language, TEXTS["fr"])
    until = facts["until"]
    status = t["profile"].format(profile=facts["profile"]) + ", " + (
        t["until"].format(time=until.strftime("%H:%M")) if until else t["no_end"])
    usage = facts["usage"]
    usage_line = f"{t['usage']} : " if language == "fr" else f"{t['usage']}: "
    usage_line += t["tablets"].format(active=usage.active, devices=usage.devices, minutes=usage.total_minutes) \
        if usage else t["no_usage"]
    overrides = [(o.id, t["kind_" + o.kind.value].format(domain=o.domain),
                  f"{t['ends'].format(time=ends.strftime('%H:%M'))} · {t['by'].format(author=o.author)}")
                 for o, ends in facts["overrides"]]
    notice, bad = None, False
    if outcome is not None:
        kind, detail = outcome
        if kind in ("open", "lock", "only", "ended"):
            notice = t["done_" + kind].format(site=detail)
        elif kind == "refused":
            notice, bad = t.get("refused_" + detail, t["refused_other"].format(reason=detail)), True
        else:
            notice, bad = t["store_down"], True
    blocks_line = None
    if facts["blocks_known"]:
        counts = ", ".join(f"{t['no_category'] if category == 'none' else category} {count}"
                           for category, count in facts["blocks"])
        blocks_line = t["blocks"].format(counts=counts or t["nothing"])
    return {"status_line": status, "usage_line": usage_line, "blocks_line": blocks_line, "overrides": overrides,
            "notice": notice, "notice_bad": bad}


def render(name: str, language: str, **values: Any) -> bytes:
    texts = TEXTS.get(language, TEXTS["fr"])
    page: bytes = _LOADER.load(f"{name}.html").generate(t=texts, lang=language, style=STYLE, **values)
    return page
