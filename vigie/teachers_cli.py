"""`vigie teachers add|passwd|remove|list`: the accounts of the teachers' page, in `server.teacher.accounts`."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from blocklists.errors import VigieError
from policy.errors import ConfigError
from policy.model import Rules
from vigie.loading import rules_or_report
from vigie.overrides import did_you_mean
from vigie.teachers import Teacher, check_password, hash_password, load_teachers, write_teachers


def add_teachers_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    teachers = commands.add_parser("teachers", help="accounts of the teachers' page: add, change a password, "
                                                    "remove, list")
    actions = teachers.add_subparsers(required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create an account (asks for its password)")
    add.add_argument("account", help="what the teacher types to sign in, e.g. mme.martin")
    add.add_argument("--name", required=True, help="shown on the page and with her overrides, e.g. \"Mme Martin\"")
    add.add_argument("--groups", required=True, help="the classes she may act on, e.g. cm2-a,cm2-b")
    passwd = actions.add_parser("passwd", help="set a new password (asks for it)")
    passwd.add_argument("account")
    remove = actions.add_parser("remove", help="delete an account (her overrides stay until they end)")
    remove.add_argument("account")
    listed = actions.add_parser("list", help="the accounts and their classes (no password, no hash)")
    for command in (add, passwd):
        command.add_argument("--password-stdin", action="store_true",
                             help="read the password from the standard input (scripts), not from the terminal")
    for command, handler in ((add, run_add), (passwd, run_passwd), (remove, run_remove), (listed, run_list)):
        command.add_argument("--rules", type=Path, default=Path("rules.yaml"))
        command.set_defaults(handler=handler)


def _accounts(args: argparse.Namespace) -> tuple[Rules, Path, dict[str, Teacher]] | None:
    rules = rules_or_report(args.rules)
    if rules is None:
        return None
    path = Path(rules.server.teacher.accounts)
    if not path.exists():
        return rules, path, {}
    try:
        return rules, path, load_teachers(path, rules)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: fix the file first; nothing was changed", file=sys.stderr)
        return None


def _new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise VigieError("the two passwords differ; nothing was changed")
    problem = check_password(password)
    if problem:
        raise VigieError(f"{problem}; nothing was changed")
    return password


def _edit(args: argparse.Namespace, change: Callable[[Rules, dict[str, Teacher]], str]) -> int:
    """Read the accounts, apply `change` (which says what it did, or raises VigieError), write them back."""
    found = _accounts(args)
    if found is None:
        return 1
    rules, path, teachers = found
    done = change(rules, teachers)
    write_teachers(path, teachers)
    load_teachers(path, rules)  # what was written reads back
    print(f"{done}; accounts in {path}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    def add(rules: Rules, teachers: dict[str, Teacher]) -> str:
        if args.account in teachers:
            raise VigieError(f"{args.account} already has an account (change its password with `vigie teachers "
                             f"passwd {args.account}`)")
        groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
        unknown = [g for g in groups if g not in rules.groups]
        if unknown or not groups:
            hint = did_you_mean(unknown[0], list(rules.groups)) if unknown else ""
            raise VigieError(f"unknown group {unknown[0]!r}{hint}" if unknown else "name at least one group "
                             "(--groups cm2-a)")
        teachers[args.account] = Teacher(args.account, args.name.strip(), groups, hash_password(_new_password(args)))
        return f"{args.account} ({args.name.strip()}) may act on {', '.join(groups)}"

    return _edit(args, add)


def run_passwd(args: argparse.Namespace) -> int:
    def passwd(rules: Rules, teachers: dict[str, Teacher]) -> str:
        teacher = _existing(teachers, args.account)
        teachers[args.account] = Teacher(teacher.account, teacher.name, teacher.groups,
                                         hash_password(_new_password(args)))
        return f"new password for {args.account} (its open sessions on the page end)"

    return _edit(args, passwd)


def run_remove(args: argparse.Namespace) -> int:
    def remove(rules: Rules, teachers: dict[str, Teacher]) -> str:
        _existing(teachers, args.account)
        del teachers[args.account]
        return f"{args.account} removed"

    return _edit(args, remove)


def run_list(args: argparse.Namespace) -> int:
    found = _accounts(args)
    if found is None:
        return 1
    _, path, teachers = found
    for teacher in sorted(teachers.values(), key=lambda t: t.account):
        print(f"{teacher.account:<24} {teacher.name:<24} {', '.join(teacher.groups)}")
    print(f"{len(teachers)} account(s) in {path}")
    return 0


def _existing(teachers: dict[str, Teacher], account: str) -> Teacher:
    if account not in teachers:
        raise VigieError(f"no account {account!r}{did_you_mean(account, list(teachers))}")
    return teachers[account]
