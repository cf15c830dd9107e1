"""Teacher accounts for the teacher's page: `teachers.yaml` beside rules.yaml, edited with `vigie teachers`.

    teachers:
      mme.martin:
        name: Mme Martin              # shown on the page and in `vigie override list`
        groups: [cm2-a, cm2-b]        # the classes she may open or lock
        password: scrypt$32768$8$1$<salt>$<hash>   # made by `vigie teachers add|passwd`, never a clear password

Passwords are hashed with scrypt (the standard library's, OpenSSL's implementation): memory-hard, salted, and
compared in constant time. The file is read like rules.yaml: every problem with its file:line:column.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from policy.errors import ConfigError, ConfigProblem
from policy.model import Rules
from policy.yaml_reader import Field, Problems

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # ~32 MB and ~0.1 s per check: slow for a guesser, fine for a login
SCRYPT_MAXMEM = 64 * 1024 * 1024
MIN_PASSWORD = 10
_ACCOUNT = re.compile(r"^[a-z0-9][a-z0-9._-]{1,39}$")


@dataclass(frozen=True)
class Teacher:
    account: str  # what she types to sign in
    name: str
    groups: tuple[str, ...]
    password_hash: str


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)))


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (a `hash_password` result); False for anything malformed."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_password(password: str) -> str | None:
    """Why `password` is not acceptable, or None."""
    if len(password) < MIN_PASSWORD:
        return f"a password has at least {MIN_PASSWORD} characters"
    if password.strip() != password:
        return "a password does not start or end with a space"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_teachers(path: Path, rules: Rules) -> dict[str, Teacher]:
    """The accounts of `path`, checked against the groups of `rules`. Raises ConfigError with every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(str(path), 0, 0, "", "no teacher accounts file (create the first account "
                                                             "with `vigie teachers add`)")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(path), 0, 0, "", f"cannot read the teacher accounts ({exc})")]) from None
    problems = Problems()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError([ConfigProblem(str(path), mark.line + 1 if mark else 0, mark.column + 1 if mark else 0, "",
                                         f"YAML syntax: {exc.problem or exc}")]) from None
    teachers: dict[str, Teacher] = {}
    if root is not None:
        top = Field(root, "", str(path), problems).mapping(("teachers",))
        for account, entry in top["teachers"].entries("a mapping of teacher accounts") if "teachers" in top else []:
            teacher = _teacher(account, entry, rules)
            if teacher is not None:
                teachers[account] = teacher
    if problems.has_errors:
        raise ConfigError(problems.items)
    return teachers


def _teacher(account: str, entry: Field, rules: Rules) -> Teacher | None:
    if not _ACCOUNT.match(account):
        entry.error(f"{account!r} is not an account name (lower-case letters, digits, `.`, `_`, `-`; "
                    "example: mme.martin)")
        return None
    keys = entry.mapping(("name", "groups", "password"), required=("name", "groups", "password"))
    name = keys["name"].text("Mme Martin") if "name" in keys else None
    groups = []
    for item in keys["groups"].items() if "groups" in keys else []:
        group = item.text("cm2-a")
        if group is not None and group not in rules.groups:
            item.error(f"unknown group {group!r} (groups: {', '.join(rules.groups)})")
        elif group is not None:
            groups.append(group)
    password = keys["password"].text("made by `vigie teachers passwd`") if "password" in keys else None
    if password is not None and not password.startswith("scrypt$"):
        keys["password"].error("not a password hash: set it with `vigie teachers passwd` (never write a password "
                               "here)")
        return None
    if name is None or password is None or not groups:
        if "groups" in keys and not groups:
            keys["groups"].error("a teacher acts on at least one group")
        return None
    return Teacher(account, name, tuple(groups), password)


def write_teachers(path: Path, teachers: dict[str, Teacher]) -> None:
    """Replace the file at once (written beside it, then renamed), readable by its owner only: it holds hashes."""
    document = {"teachers": {t.account: {"name": t.name, "groups": list(t.groups), "password": t.password_hash}
                             for t in sorted(teachers.values(), key=lambda t: t.account)}}
    text = ("# Teacher accounts for Vigie's teacher page. Edit with `vigie teachers add|passwd|remove`;\n"
            "# `vigie check` validates this file with rules.yaml.\n" + yaml.safe_dump(document, sort_keys=False,
                                                                                        allow_unicode=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".teachers-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
