"""`openpacs user ...` and `openpacs department ...`: accounts, API tokens, departments and their rules."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from ..config import Settings


def add_parsers(sub: Any, common: Any) -> None:
    u = sub.add_parser("user", help="manage users and API tokens")
    us = u.add_subparsers(dest="user_command", required=True)
    a = us.add_parser("add", help="create a user")
    a.add_argument("username")
    a.add_argument("--role", required=True, help="admin, radiologist, physician, technologist, viewer, auditor")
    a.add_argument("--departments", help="comma-separated department codes (default: every department)")
    a.add_argument("--display-name", default="")
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    a.add_argument("--no-password", action="store_true", help="token/OIDC-only account")
    us.add_parser("list", help="list users")
    p = us.add_parser("passwd", help="set a user's password (ends their sessions)")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true")
    d = us.add_parser("disable", help="disable a user (ends sessions; tokens stop working)")
    d.add_argument("username")
    d.add_argument("--enable", action="store_true", help="enable again instead")
    r = us.add_parser("role", help="change a user's role and department scope")
    r.add_argument("username")
    r.add_argument("role")
    r.add_argument("--departments")
    t = us.add_parser("token", help="create an API token (printed once)")
    t.add_argument("username")
    t.add_argument("--name", default="")
    t.add_argument("--days", type=float, help="lifetime in days [token_days setting, 90]; 0: no expiry")
    tl = us.add_parser("tokens", help="list API tokens")
    tl.add_argument("username", nargs="?")
    rv = us.add_parser("revoke", help="revoke an API token by id")
    rv.add_argument("token_id", type=int)

    dp = sub.add_parser("department", help="manage departments and the rules assigning studies to them")
    ds = dp.add_subparsers(dest="dept_command", required=True)
    ds.add_parser("list", help="list departments and rules")
    da = ds.add_parser("add", help="add a department")
    da.add_argument("code")
    da.add_argument("--name", default="")
    dr = ds.add_parser("rule", help="add a rule (criteria are comma-separated wildcard patterns)")
    dr.add_argument("department")
    dr.add_argument("--priority", type=int, default=100)
    dr.add_argument("--modality")
    dr.add_argument("--calling-aet")
    dr.add_argument("--institution")
    dr.add_argument("--institutional-department")
    dd = ds.add_parser("delete-rule", help="delete a rule by id")
    dd.add_argument("rule_id", type=int)
    ds.add_parser("reapply", help="recompute the department of every stored study from the rules")
    # the common options (--config, --data-dir, --index ...) go before or after the action: `openpacs user
    # --data-dir D list` and `openpacs user list --data-dir D` both work (leaves must not reset the group's values)
    common(u)
    common(dp)
    probe = argparse.ArgumentParser(add_help=False)
    common(probe)
    shared = {a.dest for a in probe._actions}
    for group in (us, ds):
        for leaf in group.choices.values():
            common(leaf)
            for action in leaf._actions:
                if action.dest in shared:
                    action.default = argparse.SUPPRESS


def _password(args: argparse.Namespace, prompt: bool = True) -> str | None:
    if getattr(args, "no_password", False):
        return None
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if prompt and sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise SystemExit("passwords differ")
        return first
    return ""  # generate


def run(settings: Settings, args: argparse.Namespace) -> int:
    from ..context import build_security
    from ..index.db import Index
    from ..services.auth import AuthError, generate_password

    index = Index(settings.resolved_index_url)
    index.migrate()
    auth, audit, departments = build_security(settings, index)
    actor = os.environ.get("SUDO_USER") or getpass.getuser()

    def alert(detail: str, event_type: str = "110137") -> None:
        audit.record("SecurityAlert", user=actor, protocol="CLI", event_type=event_type, detail=detail)

    try:
        if args.command == "user":
            c = args.user_command
            if c == "add":
                password = _password(args)
                generated = password == ""
                if generated:
                    password = generate_password()
                auth.add_user(args.username, password, args.role, args.departments, args.display_name)
                alert(f"user {args.username!r} created with role {args.role} (departments {args.departments or 'all'})")
                print(f"created user {args.username!r} ({args.role})")
                if generated:
                    print(f"generated password (shown once): {password}")
            elif c == "list":
                for u in auth.list_users():
                    deps = "all" if u.departments is None else ",".join(u.departments) or "-"
                    state = "disabled" if u.disabled else "active"
                    print(f"{u.username:20} {u.role:13} {deps:30} {state:8} last login {u.last_login_at or '-'}")
            elif c == "passwd":
                password = _password(args) or generate_password()
                auth.set_password(args.username, password)
                alert(f"password of {args.username!r} changed")
                if not args.password_stdin and not sys.stdin.isatty():
                    print(f"generated password (shown once): {password}")
                print("password changed; the user's sessions were ended")
            elif c == "disable":
                auth.set_disabled(args.username, not args.enable)
                alert(f"user {args.username!r} {'enabled' if args.enable else 'disabled'}")
                print(f"user {args.username!r} {'enabled' if args.enable else 'disabled'}")
            elif c == "role":
                auth.set_role(args.username, args.role, args.departments)
                alert(f"user {args.username!r} now {args.role} (departments {args.departments or 'all'})", "110136")
                print(f"user {args.username!r} is now {args.role}")
            elif c == "token":
                tid, token = auth.create_token(args.username, args.name, args.days)
                alert(f"API token {tid} created for {args.username!r}")
                print(f"token {tid} for {args.username!r} (shown once; send it as 'Authorization: Bearer ...'):")
                print(token)
            elif c == "tokens":
                for t in auth.list_tokens(args.username):
                    state = "revoked" if t["revoked"] else f"expires {t['expires_at'] or 'never'}"
                    print(f"{t['id']:5} {t['user']:20} {t['prefix']}…  {t['name'] or '-':20} {state}")
            elif c == "revoke":
                ok = auth.revoke_token(args.token_id)
                alert(f"API token {args.token_id} revoked")
                print("revoked" if ok else "no such active token")
                return 0 if ok else 1
        else:
            c = args.dept_command
            if c == "list":
                departments.ensure_standard()
                for code, name in departments.list_departments():
                    print(f"{code:20} {name}")
                for r in departments.rules():
                    crit = ", ".join(
                        f"{k}={v}"
                        for k, v in (
                            ("modality", r.modality),
                            ("calling_aet", r.calling_aet),
                            ("institution", r.institution_name),
                            ("department_name", r.institutional_department_name),
                        )
                        if v
                    )
                    print(f"rule {r.id:4} prio {r.priority:4} -> {r.department:18} {crit}")
            elif c == "add":
                departments.add_department(args.code, args.name)
                alert(f"department {args.code!r} added", "110129")
            elif c == "rule":
                departments.ensure_standard()
                rid = departments.add_rule(
                    args.department,
                    priority=args.priority,
                    modality=args.modality,
                    calling_aet=args.calling_aet,
                    institution_name=args.institution,
                    institutional_department_name=args.institutional_department,
                )
                alert(f"department rule {rid} added for {args.department!r}", "110129")
                print(f"rule {rid} added")
            elif c == "delete-rule":
                departments.delete_rule(args.rule_id)
                alert(f"department rule {args.rule_id} deleted", "110129")
            elif c == "reapply":
                n = departments.reapply()
                alert(f"department rules re-applied: {n} studies changed", "110129")
                print(f"{n} studies changed department")
    except (AuthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        audit.close()
        index.close()
    return 0
