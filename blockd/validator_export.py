"""What a validating resolver in front of blockd needs to accept its answers for listed names.

A sinkhole answer for a name in a signed zone can never validate: the validator expects the
zone's signatures and gets blockd's unsigned records, and answers SERVFAIL.  (For a name in an
unsigned zone under a signed parent blockd forwards the DS question, so the validator proves
the zone insecure and accepts the sinkhole: nothing to configure.)  `blockd export` prints the
lines that tell a validator not to validate the listed names:
  unbound-insecure       Unbound's `domain-insecure:` lines (server: clause)
  bind-validate-except   BIND's `validate-except { ... };` (options or view clause)
Knot Resolver takes the same names as negative trust anchors (`trust_anchors.set_insecure`),
PowerDNS Recursor as `addNTA(name)` in its Lua config; both are documented in the README.
The names are the entries of every list a blocking group uses, reduced to the topmost ones (a
name below another listed name is covered by it).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from blockd.config import BLOCKING_ACTIONS, Config
from blockd.lists import DomainList
from blockd.names import ancestors

FORMATS = ("unbound-insecure", "bind-validate-except")


def listed_names(config: Config, lists: dict[str, DomainList]) -> list[str]:
    """The entries of the lists blocking groups use, topmost only, sorted."""
    used = {name for group in config.groups.values() if group.action in BLOCKING_ACTIONS for name in group.lists}
    names: set[str] = set()
    for list_name in sorted(used):
        listed = lists.get(list_name)
        if listed is not None:
            names.update(listed.domains, listed.exact, listed.below)
    return sorted(name for name in names if not _covered(name, names))


def _covered(name: str, names: set[str]) -> bool:
    return any(parent in names for parent in list(ancestors(name))[1:])


def render(names: Iterable[str], fmt: str, source: str) -> str:
    """The validator configuration for the names, in one of FORMATS."""
    names = list(names)
    head = f"# blockd export --format {fmt}: {len(names)} names listed by {source}"
    if fmt == "unbound-insecure":
        return "\n".join([head, "server:", *(f'    domain-insecure: "{name}"' for name in names)]) + "\n"
    if fmt == "bind-validate-except":
        return "\n".join([head, "validate-except {", *(f'    "{name}";' for name in names), "};"]) + "\n"
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
