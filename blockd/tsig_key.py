"""TSIG keys (RFC 8945) from BIND key files, the format `tsig-keygen` and `knotc`'s `keymgr -t` write.

    // one key per file; comments: //, # and /* */
    key "rpz-key" {
        algorithm hmac-sha256;
        secret "base64==";
    };

Config: `[lists.NAME] tsig = "keys/rpz.key"` (zone transfers) and `[publish] tsig`.  A file
names exactly one key: the config points at a file, so a second key would be ambiguous.
Accepted algorithms are hmac-sha256, hmac-sha384 and hmac-sha512; hmac-md5 and hmac-sha1 are
refused (the one to use is `tsig-keygen -a hmac-sha256`), the truncated and sha224 variants
are not supported.  Every error names file:line (blockd.lists.LineError), all of them at once.
Pure: reads the one file it is given, nothing else.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.name
import dns.tsig

from blockd.bounded_read import FileRefused, ReadLimits, read_bytes
from blockd.excerpt import excerpt
from blockd.lists import LineError

ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
_REFUSED = {
    "hmac-md5": "hmac-md5 is broken and refused",
    "hmac-md5.sig-alg.reg.int": "hmac-md5 is broken and refused",
    "hmac-sha1": "hmac-sha1 is refused",
}
_ADVICE = "use hmac-sha256 or stronger (tsig-keygen -a hmac-sha256 NAME)"
_PUNCTUATION = "{};"
_WORD_END = _PUNCTUATION + '"#'


@dataclass(frozen=True)
class TsigKey:
    name: str  # lowercase, no trailing dot
    algorithm: str  # one of ALGORITHMS
    secret: bytes = field(repr=False)  # never in a log line


class KeyFileError(Exception):
    def __init__(self, errors: list[LineError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "string", or one of "{", "}", ";"
    text: str
    line: int


class _Scanner:
    """Tokens of a key file, with the line each starts on; lexical errors are collected."""

    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self.at = 0
        self.line = 1
        self.errors: list[LineError] = []

    def tokens(self) -> Iterator[_Token]:
        while self._skip_space_and_comments():
            char = self.text[self.at]
            if char in _PUNCTUATION:
                self.at += 1
                yield _Token(char, char, self.line)
            elif char == '"':
                token = self._string()
                if token is None:
                    return
                yield token
            else:
                yield self._word()

    def _skip_space_and_comments(self) -> bool:
        """Move to the next token; False at the end of the text (or an unterminated comment)."""
        text = self.text
        while self.at < len(text):
            char = text[self.at]
            if char == "\n":
                self.line += 1
                self.at += 1
            elif char.isspace():
                self.at += 1
            elif char == "#" or text.startswith("//", self.at):
                end = text.find("\n", self.at)
                self.at = len(text) if end < 0 else end
            elif text.startswith("/*", self.at):
                end = text.find("*/", self.at + 2)
                if end < 0:
                    self.errors.append(LineError(self.path, self.line, "unterminated /* comment"))
                    self.at = len(text)
                    return False
                self.line += text.count("\n", self.at, end)
                self.at = end + 2
            else:
                return True
        return False

    def _string(self) -> _Token | None:
        start_line = self.line
        end = self.text.find('"', self.at + 1)
        if end < 0:
            self.errors.append(LineError(self.path, start_line, "unterminated quoted string"))
            self.at = len(self.text)
            return None
        value = self.text[self.at + 1 : end]
        self.line += value.count("\n")
        self.at = end + 1
        return _Token("string", value, start_line)

    def _word(self) -> _Token:
        start = self.at
        text = self.text
        while self.at < len(text) and not text[self.at].isspace() and text[self.at] not in _WORD_END:
            if text.startswith("//", self.at) or text.startswith("/*", self.at):
                break
            self.at += 1
        return _Token("word", text[start : self.at], self.line)


class _Parser:
    """`key NAME { algorithm ALG; secret "B64"; };` statements, recovering after each error."""

    def __init__(self, tokens: list[_Token], path: str, errors: list[LineError]):
        self.tokens = tokens
        self.path = path
        self.errors = errors
        self.at = 0
        self.keys: list[tuple[TsigKey, int]] = []

    def _peek(self) -> _Token | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _next(self) -> _Token | None:
        token = self._peek()
        if token is not None:
            self.at += 1
        return token

    def _error(self, line: int, message: str) -> None:
        self.errors.append(LineError(self.path, line, message))

    def _last_line(self) -> int:
        return self.tokens[-1].line if self.tokens else 1

    def parse(self) -> list[tuple[TsigKey, int]]:
        while (token := self._next()) is not None:
            if token.kind == "word" and token.text.lower() == "key":
                self._key(token.line)
            else:
                self._error(token.line, f"unexpected {excerpt(token.text)}: a key file holds only key statements")
                self._skip_statement()
        return self.keys

    def _skip_statement(self) -> None:
        """Skip to the ";" ending the current statement, over any braces."""
        depth = 0
        while (token := self._next()) is not None:
            if token.kind == "{":
                depth += 1
            elif token.kind == "}":
                depth -= 1
            elif token.kind == ";" and depth <= 0:
                return

    def _key(self, line: int) -> None:
        name_token = self._next()
        if name_token is None or name_token.kind not in ("word", "string"):
            self._error(line if name_token is None else name_token.line, "key statement without a key name")
            self._skip_statement()
            return
        name = _key_name(name_token.text)
        if name is None:
            self._error(name_token.line, f"invalid key name {excerpt(name_token.text)}")
        opening = self._next()
        if opening is None or opening.kind != "{":
            self._error(name_token.line, "expected '{' after the key name")
            self._skip_statement()
            return
        clauses = self._clauses(line)
        if clauses is None:
            return
        closing = self._peek()
        if closing is not None and closing.kind == ";":
            self.at += 1
        else:
            self._error(self._last_line() if closing is None else closing.line, "expected ';' after '}'")
        key = self._build(line, clauses)
        if key is not None and name is not None:
            self.keys.append((TsigKey(name, key[0], key[1]), line))

    def _clauses(self, line: int) -> dict[str, _Token] | None:
        """The clauses up to the closing brace (consumed); None when the file ends first."""
        clauses: dict[str, _Token] = {}
        while True:
            token = self._next()
            if token is None:
                self._error(line, "key statement not closed with '};'")
                return None
            if token.kind == "}":
                return clauses
            if token.kind != "word":
                self._error(token.line, f"unexpected {excerpt(token.text)} in a key statement")
                continue
            self._clause(token, clauses)

    def _clause(self, keyword: _Token, clauses: dict[str, _Token]) -> None:
        name = keyword.text.lower()
        value = self._next()
        if value is None or value.kind not in ("word", "string"):
            self._error(keyword.line, f"{name} without a value")
            if value is not None and value.kind == "}":
                self.at -= 1
            return
        end = self._peek()
        if end is not None and end.kind == ";":
            self.at += 1
        else:
            self._error(value.line, f"expected ';' after {name} {excerpt(value.text)}")
        if name not in ("algorithm", "secret"):
            self._error(keyword.line, f"unknown clause {excerpt(name)} (a key has only algorithm and secret)")
        elif name in clauses:
            self._error(keyword.line, f"{name} given twice (first on line {clauses[name].line})")
        else:
            clauses[name] = value

    def _build(self, line: int, clauses: dict[str, _Token]) -> tuple[str, bytes] | None:
        algorithm = clauses.get("algorithm")
        secret = clauses.get("secret")
        if algorithm is None:
            self._error(line, "key has no algorithm")
        if secret is None:
            self._error(line, "key has no secret")
        if algorithm is None or secret is None:
            return None
        problem, name = _algorithm(algorithm.text)
        if problem:
            self._error(algorithm.line, problem)
        decoded, secret_problem = _secret(secret.text)
        if secret_problem:
            self._error(secret.line, secret_problem)
        if problem or secret_problem:
            return None
        return name, decoded


def _key_name(text: str) -> str | None:
    """The key name as a lowercase name without the trailing dot, or None when it is not one."""
    name = text.strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if not name or any(char.isspace() for char in name):
        return None
    try:
        dns.name.from_text(name)
    except (dns.exception.DNSException, ValueError):
        return None
    return name


def _algorithm(text: str) -> tuple[str, str]:
    """(problem or "", the algorithm's name)."""
    name = text.lower().rstrip(".")
    if name in ALGORITHMS:
        return "", name
    if name in _REFUSED:
        return f"algorithm {text}: {_REFUSED[name]}; {_ADVICE}", name
    return f"algorithm {excerpt(text)} is not supported; {_ADVICE}", name


def _secret(text: str) -> tuple[bytes, str]:
    """(the decoded secret, problem or "")."""
    compact = "".join(text.split())
    try:
        secret = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return b"", "secret is not valid base64"
    if not secret:
        return b"", "secret is empty"
    return secret, ""


def parse_keys(text: str, path: str) -> tuple[list[tuple[TsigKey, int]], list[LineError]]:
    """Every key in a key file's text with the line it starts on, and every error."""
    scanner = _Scanner(text, path)
    tokens = list(scanner.tokens())
    lexical = list(scanner.errors)
    parser = _Parser(tokens, path, [])
    keys = parser.parse()
    errors = parser.errors
    if lexical:
        # The rest of the file was swallowed by the unterminated string or comment: what the
        # parser says from there on is only an echo of it.
        errors = [error for error in errors if error.line < lexical[0].line]
    return keys, sorted(lexical + errors, key=lambda error: error.line)


def parse_key_file(text: str, path: str) -> TsigKey:
    """The one key of a key file's text; raises KeyFileError naming file:line for every problem."""
    keys, errors = parse_keys(text, path)
    if not errors and not keys:
        errors.append(LineError(path, 0, "no key statement in the file"))
    if not errors and len(keys) > 1:
        listed = ", ".join(f"{key.name!r} on line {line}" for key, line in keys)
        errors.append(LineError(path, keys[1][1], f"one key per file, found {len(keys)}: {listed}"))
    if errors:
        raise KeyFileError(errors)
    return keys[0][0]


# A key file holds one short key statement: anything much larger is not one.
KEY_FILE_LIMITS = ReadLimits(max_bytes=65536, max_line_bytes=4096)


def load_key_file(path: str | Path) -> TsigKey:
    """Read and parse a key file; raises KeyFileError (unreadable files included).  Only a
    regular file within KEY_FILE_LIMITS is read (blockd.bounded_read)."""
    shown = str(path)
    try:
        text = read_bytes(path, KEY_FILE_LIMITS).decode("utf-8")
    except FileRefused as exc:
        raise KeyFileError([LineError(shown, exc.line, f"cannot read the key file: {exc.message}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeyFileError([LineError(shown, 0, f"cannot read the key file: {reason}")]) from None
    return parse_key_file(text, shown)


def to_dnspython(key: TsigKey) -> dns.tsig.Key:
    """The key as dnspython signs and verifies with."""
    return dns.tsig.Key(key.name + ".", key.secret, key.algorithm + ".")
